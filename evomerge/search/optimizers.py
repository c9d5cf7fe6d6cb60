"""Black-box optimizers over the unit box [0,1]^d behind one ask/tell interface.

Nothing here knows about models: a genome is a float vector, a fitness is a number to maximize.
Every optimizer records its candidates as trials of one Optuna study (the run store's), so
`optuna-dashboard` shows cma runs and Optuna-sampler runs alike:

- "cmaes" (the `cma` package) proposes genomes itself; `open_trial(i)` enqueues the genome and
  asks the study for a trial that holds exactly those parameters. Its state (the pickled ES and its
  private random state) is checkpointed, so a resumed run re-asks exactly the same generation.
- "optuna-cmaes", "tpe", "nsga2", "random" are Optuna samplers: `ask()` creates `popsize` trials
  in the study (Optuna's ask is atomic on RDB storages, so several workers can share a study).
"""

from __future__ import annotations

import contextlib
import math
import pickle
import warnings
from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

import numpy as np
import optuna

from evomerge.errors import ConfigError

OPTIMIZERS = ("cmaes", "optuna-cmaes", "tpe", "nsga2", "random")


def gene_name(i: int) -> str:
    """Optuna parameter name of gene i (zero padded so the dashboard sorts them)."""
    return f"g{i:04d}"


def default_popsize(dim: int) -> int:
    """CMA-ES default population 4 + floor(3 ln d) (Hansen; used by Sakana's EvoLLM)."""
    return 4 + int(math.floor(3 * math.log(max(dim, 1))))


def _as_values(value: float | Sequence[float], n_objectives: int) -> list[float]:
    vals = [float(value)] if np.isscalar(value) else [float(v) for v in value]  # type: ignore[arg-type]
    if len(vals) != n_objectives:
        raise ValueError(f"expected {n_objectives} fitness value(s), got {len(vals)}")
    return vals


class Optimizer(ABC):
    """Maximizes fitness over [0,1]^dim, one generation (batch) at a time."""

    name: str = ""
    #: True when `ask()` after `load_state_dict()` returns the same genomes again (cma): the driver
    #: then reuses finished trials of an interrupted generation instead of evaluating them again.
    reproducible_ask: bool = False
    #: True when several worker processes may drive one study with this optimizer at once.
    parallel_safe: bool = False

    def __init__(self, dim: int, *, seed: int, n_objectives: int = 1, popsize: int | None = None):
        if dim < 1:
            raise ConfigError(f"search space has {dim} dimensions; need at least 1", key="genome")
        if popsize is not None and popsize < 1:
            raise ConfigError(f"popsize {popsize} must be >= 1", key="popsize")
        self.dim = int(dim)
        self.seed = int(seed)
        self.n_objectives = int(n_objectives)
        self.popsize = int(popsize) if popsize is not None else default_popsize(dim)
        self.generation = 0
        self.study: optuna.Study | None = None
        self._own_study = False  # True when no run store gave us a study (stand-alone use)

    # -- study binding -------------------------------------------------------------------------
    def bind(self, study: optuna.Study) -> None:
        """Record this optimizer's trials in `study` (the run store's)."""
        self.study = study

    def _ensure_study(self) -> optuna.Study:
        if self.study is None:  # stand-alone use (tests, notebooks): an in-memory study
            self.bind(
                optuna.create_study(
                    directions=["maximize"] * self.n_objectives,
                    sampler=optuna.samplers.RandomSampler(seed=self.seed),
                )
            )
            self._own_study = True
        assert self.study is not None
        return self.study

    # -- the interface -------------------------------------------------------------------------
    @abstractmethod
    def ask(self, n: int | None = None) -> list[np.ndarray]:
        """Propose the current generation. `n` caps the batch of samplers that create trials while
        asking (so a run does not open trials it has no budget for); cma always returns its whole
        population."""

    @abstractmethod
    def open_trial(self, index: int) -> optuna.trial.Trial:
        """The RUNNING study trial that holds genome `index` of the last `ask()`."""

    @abstractmethod
    def tell(self, genomes: Sequence[np.ndarray], values: Sequence[float | Sequence[float]]) -> None:
        """Report fitness (to MAXIMIZE) of every genome of the last `ask()`; advances the generation."""

    def unopened_trials(self) -> list[optuna.trial.Trial]:
        """Trials created by `ask()` that were never handed out by `open_trial` (to be cancelled
        when a run stops mid-generation)."""
        return []

    def should_stop(self) -> bool:
        return False

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last `tell` (picklable)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def _tell_study(self, values: Sequence[float | Sequence[float]], trials: Sequence[optuna.trial.Trial]) -> None:
        """Finish the trials in stand-alone use; under a run store the store finishes them (with
        their records) before `tell`."""
        if not self._own_study:
            return
        study = self._ensure_study()
        for trial, v in zip(trials, values):
            vals = _as_values(v, self.n_objectives)
            if all(math.isfinite(x) for x in vals):
                study.tell(trial, vals, skip_if_finished=True)
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _ask(study: optuna.Study) -> optuna.trial.Trial:
    """study.ask() without Optuna's warning that heartbeats are meant for study.optimize (the
    driver records heartbeats itself)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


def _global_randn(*shape: int) -> np.ndarray:
    """numpy's global randn behind a module-level name: cma pickles a reference to it, where
    pickling `np.random.randn` itself would freeze a copy of the global RandomState into the
    checkpoint and a resumed ES would draw from that copy."""
    return np.random.randn(*shape)


@contextlib.contextmanager
def _private_global_rng(rng: np.random.RandomState) -> Iterator[None]:
    """Run with numpy's global RNG set to `rng`'s state, then put both back.

    `cma` draws from `np.random` (the global state) in several places; swapping a private state in
    makes its draws independent of anything else in the process and lets us checkpoint them."""
    saved = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(saved)


class CMAOptimizer(Optimizer):
    """CMA-ES from the `cma` package, box-constrained to [0,1]^d, with optional IPOP restarts.

    Defaults follow Sakana's EvoLLM: start at the centre, sigma0 = 1/6, popsize 4 + floor(3 ln d).
    With `restarts > 0`, when cma says stop the ES restarts from x0 with twice the population.
    One process per run (the driver takes a lock): the ES lives in this process."""

    name = "cmaes"
    reproducible_ask = True
    parallel_safe = False

    def __init__(
        self,
        dim: int,
        *,
        seed: int,
        n_objectives: int = 1,
        popsize: int | None = None,
        sigma0: float = 1 / 6,
        x0: Sequence[float] | None = None,
        restarts: int = 0,
        cma_options: dict[str, Any] | None = None,
    ):
        super().__init__(dim, seed=seed, n_objectives=n_objectives, popsize=popsize)
        if n_objectives != 1:
            raise ConfigError(
                f"cmaes optimizes one objective, got {n_objectives}", key="optimizer", allowed="nsga2, tpe, random"
            )
        if not 0 < sigma0:
            raise ConfigError(f"sigma0 {sigma0} must be > 0", key="sigma0")
        self.sigma0 = float(sigma0)
        self.x0 = np.full(dim, 0.5) if x0 is None else np.clip(np.asarray(x0, dtype=float), 0.0, 1.0)
        if self.x0.shape != (dim,):
            raise ConfigError(f"x0 has {self.x0.size} values, the genome has {dim}", key="x0")
        self.restarts = int(restarts)
        self.restarts_done = 0
        self.cma_options = dict(cma_options or {})
        self._rng = np.random.RandomState(self.seed % 2**32)
        self.es = self._new_es(self.popsize)
        self._asked: list[np.ndarray] | None = None
        self._es_xs: list[np.ndarray] = []
        self._trials: dict[int, optuna.trial.Trial] = {}

    def _new_es(self, popsize: int):
        import cma

        opts = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "randn": _global_randn,  # draws happen inside _private_global_rng, seeded by self.seed
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "verb_filenameprefix": "",
        }
        opts.update(self.cma_options)
        with _private_global_rng(self._rng), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cma.CMAEvolutionStrategy(self.x0.tolist(), self.sigma0, opts)

    def _cma_stopped(self) -> bool:
        with _private_global_rng(self._rng), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(self.es.stop())

    def should_stop(self) -> bool:
        return self._cma_stopped() and self.restarts_done >= self.restarts

    def bind(self, study: optuna.Study) -> None:
        super().bind(study)
        # parameters come from enqueue_trial; a cheap sampler avoids TPE bookkeeping per trial
        study.sampler = optuna.samplers.RandomSampler(seed=self.seed)

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        if self._cma_stopped() and self.restarts_done < self.restarts:
            self.restarts_done += 1
            self.es = self._new_es(int(self.es.popsize) * 2)
        with _private_global_rng(self._rng), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xs = self.es.ask()
        self._es_xs = xs  # handed back to es.tell as is: cma maps them to genotypes by their bytes
        self._asked = [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in xs]
        self._trials = {}
        return [x.copy() for x in self._asked]

    def open_trial(self, index: int) -> optuna.trial.Trial:
        if self._asked is None:
            raise RuntimeError("open_trial() before ask()")
        study = self._ensure_study()
        genome = self._asked[index]
        params = {gene_name(i): float(v) for i, v in enumerate(genome)}
        from evomerge.store import sqlite_backend, write_float_params

        if sqlite_backend(study) is not None:  # the run store: one bulk insert instead of a commit per gene
            trial = _ask(study)
            write_float_params(study, trial, params)
        else:
            study.enqueue_trial(params, skip_if_exists=False)
            trial = _ask(study)
            for i in range(self.dim):
                trial.suggest_float(gene_name(i), 0.0, 1.0)
        self._trials[index] = trial
        return trial

    def tell(self, genomes: Sequence[np.ndarray], values: Sequence[float | Sequence[float]]) -> None:
        if self._asked is None:
            raise RuntimeError("tell() before ask()")
        if len(genomes) != len(self._asked):
            raise ValueError(f"tell() got {len(genomes)} genomes, the generation has {len(self._asked)}")
        fit = [_as_values(v, 1)[0] for v in values]
        if not all(math.isfinite(f) for f in fit):
            raise ValueError("cma needs finite fitness values; give failed candidates the worst fitness")
        if self._trials:
            opened = sorted(self._trials)
            self._tell_study([values[i] for i in opened], [self._trials[i] for i in opened])
        with _private_global_rng(self._rng), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # cma minimizes; pass the genomes as asked (tell checks them against its own samples)
            self.es.tell(self._es_xs, [-f for f in fit])
        self._asked = None
        self._trials = {}
        self.generation += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "generation": self.generation,
            "restarts_done": self.restarts_done,
            "es": self.es.pickle_dumps(),
            "rng": self._rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("dim") != self.dim:
            raise ConfigError(
                f"checkpoint is for optimizer {state.get('name')} with {state.get('dim')} genes, "
                f"this run uses {self.name} with {self.dim}",
                key="optimizer",
            )
        self.es = pickle.loads(state["es"])
        self._rng.set_state(state["rng"])
        self.generation = int(state["generation"])
        self.restarts_done = int(state["restarts_done"])
        self._asked = None
        self._trials = {}


class OptunaOptimizer(Optimizer):
    """An Optuna sampler driving the study directly: each genome is a trial with one
    `suggest_float(g0000, 0, 1)` per gene. The sampler learns from the study's finished trials, so
    `tell` has nothing to do once the run store has finished the trials."""

    parallel_safe = True

    def __init__(self, name: str, sampler: optuna.samplers.BaseSampler, dim: int, *, seed: int,
                 n_objectives: int = 1, popsize: int | None = None):
        super().__init__(dim, seed=seed, n_objectives=n_objectives, popsize=popsize)
        self.name = name
        self.sampler = sampler
        self._pending: list[optuna.trial.Trial] = []
        self._handed: set[int] = set()

    def bind(self, study: optuna.Study) -> None:
        super().bind(study)
        study.sampler = self.sampler

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        study = self._ensure_study()
        size = self.popsize if n is None else max(1, min(self.popsize, int(n)))
        self._pending, self._handed = [], set()
        genomes = []
        for _ in range(size):
            trial = _ask(study)
            genomes.append(np.array([trial.suggest_float(gene_name(i), 0.0, 1.0) for i in range(self.dim)]))
            self._pending.append(trial)
        return genomes

    def open_trial(self, index: int) -> optuna.trial.Trial:
        self._handed.add(index)
        return self._pending[index]

    def unopened_trials(self) -> list[optuna.trial.Trial]:
        return [t for i, t in enumerate(self._pending) if i not in self._handed]

    def tell(self, genomes: Sequence[np.ndarray], values: Sequence[float | Sequence[float]]) -> None:
        if len(values) != len(self._pending):
            raise ValueError(f"tell() got {len(values)} values, the batch has {len(self._pending)}")
        self._tell_study(values, self._pending)
        self._pending, self._handed = [], set()
        self.generation += 1

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "generation": self.generation, "sampler": pickle.dumps(self.sampler)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name or state.get("dim") != self.dim:
            raise ConfigError(
                f"checkpoint is for optimizer {state.get('name')} with {state.get('dim')} genes, "
                f"this run uses {self.name} with {self.dim}",
                key="optimizer",
            )
        self.sampler = pickle.loads(state["sampler"])
        self.generation = int(state["generation"])
        if self.study is not None:
            self.study.sampler = self.sampler


def make_optimizer(
    name: str,
    dim: int,
    *,
    seed: int,
    n_objectives: int = 1,
    popsize: int | None = None,
    sigma0: float = 1 / 6,
    x0: Sequence[float] | None = None,
    restarts: int = 0,
    sampler_kwargs: dict[str, Any] | None = None,
) -> Optimizer:
    """Build an optimizer by name (see OPTIMIZERS). `sampler_kwargs` go to the Optuna sampler's
    constructor, or for "cmaes" into cma's options dict."""
    kw = dict(sampler_kwargs or {})
    if name == "cmaes":
        return CMAOptimizer(dim, seed=seed, n_objectives=n_objectives, popsize=popsize, sigma0=sigma0, x0=x0,
                            restarts=restarts, cma_options=kw)
    pop = popsize if popsize is not None else default_popsize(dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "optuna-cmaes":
            if n_objectives != 1:
                raise ConfigError(f"optuna-cmaes optimizes one objective, got {n_objectives}", key="optimizer",
                                  allowed="nsga2, tpe, random")
            if restarts > 0:
                raise ConfigError("optuna-cmaes has no restarts (Optuna 4.4 dropped them)", key="restarts",
                                  allowed="0, or optimizer cmaes for IPOP restarts")
            # Optuna's defaults already are the centre of the box and sigma0 = range / 6
            if x0 is not None:
                kw.setdefault("x0", {gene_name(i): float(v) for i, v in enumerate(x0)})
            if not math.isclose(sigma0, 1 / 6):
                kw.setdefault("sigma0", sigma0)
            kw.setdefault("popsize", pop)
            warnings.simplefilter("ignore", FutureWarning)
            sampler: optuna.samplers.BaseSampler = optuna.samplers.CmaEsSampler(seed=seed, **kw)
        elif name == "tpe":
            kw.setdefault("constant_liar", True)  # batches of pending trials: do not propose the same point
            sampler = optuna.samplers.TPESampler(seed=seed, **kw)
        elif name == "nsga2":
            kw.setdefault("population_size", max(pop, 2))
            sampler = optuna.samplers.NSGAIISampler(seed=seed, **kw)
        elif name == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed, **kw)
        else:
            raise ConfigError(f"unknown optimizer '{name}'", key="optimizer", allowed=", ".join(OPTIMIZERS))
    return OptunaOptimizer(name, sampler, dim, seed=seed, n_objectives=n_objectives, popsize=pop)
