"""Wiring a run end to end (config -> genome space -> optimizer -> merger -> evaluator -> store -> results):
`context` (what a run holds), `run` (run / resume / finish), `heldout` (the held-out table), `baselines`
(the hand-made merges to beat)."""
