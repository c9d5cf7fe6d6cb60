"""Known library warnings, filtered once for the whole process: the CLI calls `install()` before any command
runs; `evomerge --verbose` skips the filters (and shows evomerge's own INFO log lines).

Each entry says why it is noise for an evomerge user: a warning about how a library calls another library,
repeated for every candidate of a search, says nothing about the user's merge.
"""

from __future__ import annotations

import logging
import warnings

# (category, regex matched against the start of the message, why it is filtered)
KNOWN: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, r"`past_key_values` is deprecated",
     "transformers 5 renamed generate()'s and the mask builders' past_key_values to cache; lm-eval and the "
     "decoding loop still pass the old name, once per candidate"),
    (FutureWarning, r"Both `past_key_values` and `cache` are set", "the same rename, seen from the other side"),
    # Optuna's ExperimentalWarning (matched by message: importing optuna here would slow every command down)
    (Warning, r".* is experimental \(supported from v", "Optuna samplers and options evomerge uses on purpose"),
    (Warning, r"Argument ``.*`` is an experimental feature", "Optuna sampler arguments evomerge sets on purpose"),
]

_installed = False


def install(*, verbose: bool = False) -> None:
    """Filter the KNOWN warnings (once per process); with `verbose`, leave every warning on and log INFO."""
    global _installed
    if verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("evomerge").setLevel(logging.INFO)
        return
    if _installed:
        return
    for category, message, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
    _installed = True
