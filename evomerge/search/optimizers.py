"""Black-box optimizers over the unit box [0,1]^d behind one ask/tell interface.

Nothing here knows about models or storage: a genome is a float vector, a fitness is a number to
maximize, and an optimizer only proposes (as Optuna's samplers only propose values):

- "cmaes" (the `cma` package) proposes whole generations with `ask()`. Its state (the pickled ES and
  its private random state) is kept in the run's storage, so a resumed run re-asks exactly the same
  generation.
- "optuna-cmaes", "tpe", "nsga2", "random" are Optuna samplers: they propose inside trials the run
  store opens (`sample(trial)`); Optuna's ask is atomic on RDB storages, so several workers can share
  a study.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import warnings
from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence, cast

import numpy as np
import optuna

from evomerge.config import OPTIMIZERS
from evomerge.errors import ConfigError
from evomerge.spaces.genes import GeneLayout


def worker_seed(seed: int, slot: int) -> int:
    """Each worker's sampler seed: the run seed for the first worker, a distinct one for the others."""
    return seed if slot == 0 else (seed + 7919 * slot) % 2**31


def default_popsize(dim: int) -> int:
    """CMA-ES default population 4 + floor(3 ln d) (Hansen; used by Sakana's EvoLLM)."""
    return 4 + int(math.floor(3 * math.log(max(dim, 1))))


def _as_values(value: float | Sequence[float], n_objectives: int) -> list[float]:
    # np.isscalar narrows to numpy's scalar types (complex, str, ...), not to our float / Sequence[float]
    if np.isscalar(value):
        vals = [float(cast(float, value))]
    else:
        vals = [float(v) for v in cast(Sequence[float], value)]
    if len(vals) != n_objectives:
        raise ValueError(f"expected {n_objectives} fitness value(s), got {len(vals)}")
    return vals


class Optimizer(ABC):
    """Maximizes fitness over [0,1]^dim, one generation (batch) at a time. It proposes genomes and
    learns from their fitness; it never opens, closes or stores trials (the driver and the run store do).

    Two ways to propose, as the two families of optimizers work:
    - `ask()` returns the generation's genomes (cma); the store opens a trial holding each;
    - with `samples_in_trials`, the store opens trials and `sample(trial)` fills each with the
      sampler's proposal (Optuna samplers propose inside a trial of the study they learn from).
    """

    name: str = ""
    #: True: proposals are made inside trials the store opens (`sample`), not by `ask`.
    samples_in_trials: bool = False

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
        #: the sampler the study uses for trials opened under this optimizer
        self.sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=self.seed)

    def batch_size(self, n: int | None = None) -> int:
        """Genomes in the next generation, capped by `n` (the remaining budget) for samplers."""
        return self.popsize if n is None else max(1, min(self.popsize, int(n)))

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        """Propose the current generation (cma always returns its whole population)."""
        raise NotImplementedError(f"{self.name} proposes inside trials: use sample()")

    def sample(self, trial: optuna.trial.Trial) -> np.ndarray:
        """Fill a trial the store opened with the sampler's proposal; return it as a genome."""
        raise NotImplementedError(f"{self.name} proposes whole generations: use ask()")

    @abstractmethod
    def tell(self, genomes: Sequence[np.ndarray], values: Sequence[float | Sequence[float]]) -> None:
        """Report fitness (to MAXIMIZE) of every genome of the generation; advances the generation."""

    def should_stop(self) -> bool:
        return False

    def start_at(self, x0: np.ndarray) -> None:
        """Start the search at `x0` (a warm start; before the first ask). Samplers learn from the trials
        instead, so by default this does nothing."""
        return None

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last `tell` (picklable)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
    Its state is saved after each `tell`; `ask` from a restored state returns the same generation again
    (the ES and its private random state are restored), so any worker can re-ask a generation that others
    evaluated and tell it. (A state saved between ask and tell would not do: cma finds its samples by
    hashes that differ between processes.)"""

    name = "cmaes"

    def __init__(
        self,
        dim: int,
        *,
        seed: int,
        n_objectives: int = 1,
        popsize: int | None = None,
        sigma0: float = 1 / 6,
        x0: Sequence[float] | np.ndarray | None = None,
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

    def start_at(self, x0: np.ndarray) -> None:
        """The ES's mean at `x0`, with the same seed and sigma as a fresh start."""
        self.x0 = np.clip(np.asarray(x0, dtype=float), 0.0, 1.0)
        self._rng = np.random.RandomState(self.seed % 2**32)
        self.es = self._new_es(self.popsize)

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        if self._cma_stopped() and self.restarts_done < self.restarts:
            self.restarts_done += 1
            self.es = self._new_es(int(self.es.popsize) * 2)
        with _private_global_rng(self._rng), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xs = self.es.ask()
        self._es_xs = xs  # handed back to es.tell as is: cma maps them to genotypes by their bytes
        self._asked = [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in xs]
        return [x.copy() for x in self._asked]

    def tell(self, genomes: Sequence[np.ndarray], values: Sequence[float | Sequence[float]]) -> None:
        if self._asked is None:
            raise RuntimeError("tell() before ask()")
        if len(genomes) != len(self._asked):
            raise ValueError(f"tell() got {len(genomes)} genomes, the generation has {len(self._asked)}")
        fit = [_as_values(v, 1)[0] for v in values]
        if not all(math.isfinite(f) for f in fit):
            raise ValueError("cma needs finite fitness values; give failed candidates the worst fitness")
        with _private_global_rng(self._rng), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # cma minimizes; pass the genomes as asked (tell checks them against its own samples)
            self.es.tell(self._es_xs, [-f for f in fit])
        self._asked = None
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
        _check_state(self, state)
        self.es = pickle.loads(state["es"])
        self._rng.set_state(state["rng"])
        self.generation = int(state["generation"])
        self.restarts_done = int(state["restarts_done"])
        self._asked = None


class OptunaOptimizer(Optimizer):
    """An Optuna sampler: each genome is a trial with one `suggest_float(g0000, 0, 1)` per gene. The
    sampler learns from the study's finished trials, so `tell` only advances the generation."""

    samples_in_trials = True

    def __init__(self, name: str, sampler: optuna.samplers.BaseSampler, dim: int, *, seed: int,
                 n_objectives: int = 1, popsize: int | None = None):
        super().__init__(dim, seed=seed, n_objectives=n_objectives, popsize=popsize)
        self.name = name
        self.sampler = sampler

    def use_genes(self, layout: GeneLayout) -> None:
        """Propose under these names and real-unit ranges (what the study and optuna-dashboard show)."""
        if len(layout) != self.dim:
            raise ValueError(f"the gene layout has {len(layout)} genes, the optimizer {self.dim}")
        self.layout = layout

    def sample(self, trial: optuna.trial.Trial) -> np.ndarray:
        layout = getattr(self, "layout", None) or GeneLayout.unit(self.dim)
        values = [trial.suggest_float(n, lo, hi) for n, lo, hi in zip(layout.names, layout.lows, layout.highs)]
        return np.clip(layout.genome(values), 0.0, 1.0)

    def tell(self, genomes: Sequence[np.ndarray], values: Sequence[float | Sequence[float]]) -> None:
        if len(values) != len(genomes):
            raise ValueError(f"tell() got {len(values)} values for {len(genomes)} genomes")
        self.generation += 1

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "generation": self.generation,
                "sampler": pickle.dumps(self.sampler)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state)
        self.sampler = pickle.loads(state["sampler"])
        self.generation = int(state["generation"])


def _check_state(opt: Optimizer, state: dict[str, Any]) -> None:
    if state.get("name") != opt.name or state.get("dim") != opt.dim:
        raise ConfigError(
            f"the stored optimizer state is for {state.get('name')} with {state.get('dim')} genes, "
            f"this run uses {opt.name} with {opt.dim}",
            key="optimizer",
        )


def make_optimizer(
    name: str,
    dim: int,
    *,
    seed: int,
    n_objectives: int = 1,
    popsize: int | None = None,
    sigma0: float = 1 / 6,
    x0: Sequence[float] | np.ndarray | None = None,
    restarts: int = 0,
    sampler_kwargs: dict[str, Any] | None = None,
    slot: int = 0,
    layout: GeneLayout | None = None,
) -> Optimizer:
    """Build an optimizer by name (see OPTIMIZERS). `sampler_kwargs` go to the Optuna sampler's
    constructor, or for "cmaes" into cma's options dict. `slot`: the worker's slot in a shared run: each
    worker's sampler draws from its own seed; cma's generations are shared, so it keeps the run seed."""
    kw = dict(sampler_kwargs or {})
    if name == "cmaes":
        return CMAOptimizer(dim, seed=seed, n_objectives=n_objectives, popsize=popsize, sigma0=sigma0, x0=x0,
                            restarts=restarts, cma_options=kw)
    pop = popsize if popsize is not None else default_popsize(dim)
    seed = worker_seed(seed, slot)
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
                kw.setdefault("x0", (layout or GeneLayout.unit(dim)).params(np.asarray(x0)))
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
    opt = OptunaOptimizer(name, sampler, dim, seed=seed, n_objectives=n_objectives, popsize=pop)
    if layout is not None:
        opt.use_genes(layout)
    return opt
