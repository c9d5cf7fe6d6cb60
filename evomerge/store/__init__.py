"""The run store: a run folder (`folder`), who works on it (`locks`), the Optuna storage underneath
(`backend`, the only module that touches Optuna internals), trial records (`records`) and `RunStore`."""

from evomerge.store.folder import RunFolder, atomic_write_bytes, atomic_write_text
from evomerge.store.records import FINISHED_STATUSES, TrialRecord
from evomerge.store.run_store import RunStore, sha256_text

__all__ = ["FINISHED_STATUSES", "RunFolder", "RunStore", "TrialRecord", "atomic_write_bytes", "atomic_write_text",
           "sha256_text"]
