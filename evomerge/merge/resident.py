"""Device-resident merging for the search: source weights are read once, each candidate is merged in place into
one live transformers model. Nothing goes to disk per candidate.

The memory plan (``evomerge.models.memory.plan_memory``) picks what is held: base + deltas for the
task-arithmetic family (never the models), the sources for linear / slerp / ..., TIES threshold tables plus the
ranks of tied elements (exact) or flat-index tie cutoffs (inexact, only when the exact layout does not fit),
DELLA rank tables, and host offload only as the last resort (a warning with the plan). ``resident_bytes()``
measures what is held; it equals the plan's items (tested) for `embeddings: merge`. With `keep_target` the
target's embedding rows are not held at all and with `align` the rows are the target's count, so there the plan
(which counts the base model's tensors) is an upper bound.

Per candidate each tensor is merged by one fused pass (``fused``: torch.compile'd, or eagerly in chunks) that
writes straight into the live parameter: no merged copy of the model, scratch bounded by a few tensors.
The numbers are those of `evomerge merge` bit for bit (the same planner, the same vocabulary aligners, mergekit's
op order and roundings, the same per-tensor DARE/DELLA generators); a CUDA run builds its TIES tables with
mergekit's CPU argsort order, so it keeps what `evomerge merge` on CPU keeps.
"""

from __future__ import annotations

import logging
import warnings

import torch

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError, ModelLoadError
from evomerge.merge.candidate import GTA_METHODS, HeldTensor, merge_gta, merge_linear
from evomerge.merge.execute import make_generator
from evomerge.merge.fused import FusedKernels, compile_available
from evomerge.merge.held import STEPS, Holdings
from evomerge.merge.plan import build_plan
from evomerge.merge.registry import METHODS, merge_tensor, resolve_params
from evomerge.merge.session import MergeSession
from evomerge.models.memory import MemoryPlan, TieBytes, param_shapes, plan_memory
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

FAST_TIES_STEPS = STEPS  # density grid 0.001, the search space's default for densities
COMPILE_MIN_BYTES = 256 * 2**20  # fused="auto" compiles when a candidate moves at least this much


class ResidentMerger:
    """Holds what the memory plan says on `device` (or pinned host memory) for a whole run.

    `fast_ties`: "argsort" = TIES trims by precomputed thresholds, exactly as mergekit (its argsort order among
    tied magnitudes), or by flat index if that does not fit; "index" = by flat index always; "off" = mergekit's
    sort on every merge. `offload`: "auto" (the plan), "never", "always". `fused`: "auto" (compile for large
    models, eager otherwise), "compile", "eager".
    """

    def __init__(self, template: Recipe, *, device: str = "cpu", offload: str = "auto", fast_ties: str = "argsort",
                 source: str = "<space>", session: MergeSession | None = None, fused: str = "auto"):
        self.session = session or MergeSession.open(template, device="cpu", source=source)
        self.layouts = self.session.layouts
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", file=source, key="device", allowed="cpu")
        if fast_ties not in ("argsort", "index", "off"):
            raise ConfigError(f"unknown fast_ties mode '{fast_ties}'", file=source, key="fast_ties",
                              allowed="argsort, index, off")
        if offload not in ("auto", "never", "always"):
            raise ConfigError(f"unknown offload mode '{offload}'", file=source, key="offload",
                              allowed="auto, never, always")
        if fused not in ("auto", "compile", "eager"):
            raise ConfigError(f"unknown fused mode '{fused}'", file=source, key="fused", allowed="auto, compile, eager")
        self.dtype = DTYPES[template.dtype or "float32"]
        self.template = template
        self.method = template.merge_method
        self.plan = build_plan(template, self.layouts, source=source)
        self._ties_exact = {"argsort": "auto", "index": "thresholds", "off": "sort"}[fast_ties]
        self._offload = offload
        from evomerge.merge.materialize import output_config

        self._config = output_config(self.plan, self.session.sources, str(self.dtype).removeprefix("torch."))
        self._shapes = param_shapes(self._config)
        self.memory_plan = self._memory_plan(None)  # before loading: upper bounds for the tie data
        ties = None
        if "tied ranks" in self.memory_plan.layout:
            ties = "exact"
        elif ", thresholds" in self.memory_plan.layout:
            ties = "index"
        self.offloaded = self.memory_plan.offload and self.device.type == "cuda"
        host = {it.key for it in self.memory_plan.host_items} if self.offloaded else set()
        self.held = Holdings(self.plan, self.session.fetch, self.session.aligners, device=self.device, ties=ties,
                             host=host)
        self.fast = self.held.ties is not None
        if ties is not None:  # the tie data as measured, instead of its upper bound
            measured = TieBytes(exact=self.held.tie_bytes("ranks")) if ties == "exact" else \
                TieBytes(index=self.held.tie_bytes("tie cutoffs"))
            self.memory_plan = self._memory_plan(measured)
        if self.memory_plan.offload or not self.memory_plan.fits:
            what = "streaming from host memory every candidate" if self.offloaded else \
                "expect swapping or an out-of-memory error"
            msg = f"the resident weights do not fit on the device; {what}\n{self.memory_plan.describe()}"
            log.warning(msg)
            warnings.warn(msg, ResourceWarning, stacklevel=2)
        else:
            log.info("%s", self.memory_plan.describe())
        self.model = self._live_model()
        self._params = dict(self.model.named_parameters())
        missing = [tp.out_name for tp in self.plan.tensors if tp.out_name not in self._params]
        if missing:
            raise ModelLoadError(f"the live model has no parameter {missing[0]}", file=source)
        # token_rows: (row ids, rows) written over every merge of a token table
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for tp in self.plan.tensors:
            found = self.session.rows_for(tp)
            if found is not None:
                self._rows[tp.out_name] = (found[0].to(self.device), found[1].to(self.device, self.dtype))
        with torch.no_grad():
            for name, kept in self.held.kept.items():  # keep_target: the target's rows, once
                self._params[name].copy_(kept)
            for name, (ids, values) in self._rows.items():
                self._params[name].index_copy_(0, ids, values)
        self.held.kept.clear()
        moved = sum(v for k, v in self.resident_bytes().items() if k in ("base", "deltas", "sources"))
        mode = "compile" if fused == "compile" or (fused == "auto" and moved >= COMPILE_MIN_BYTES) else "eager"
        self.kernels = FusedKernels(mode if compile_available() else "eager")

    # -- set-up --------------------------------------------------------------------------------------
    def _memory_plan(self, ties: TieBytes | None) -> MemoryPlan:
        n_models = max(len(tp.inputs) for tp in self.plan.tensors)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free
        else:
            import os

            budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return plan_memory(self._config, n_experts=n_models - 1,
                           method=self.method, dtype=str(self.dtype).removeprefix("torch."), device_bytes=budget,
                           ties_exact=self._ties_exact, shapes=self._shapes, ties=ties,  # type: ignore[arg-type]
                           device_type=self.device.type, offload=self._offload,  # type: ignore[arg-type]
                           reserve_bytes=0 if self.device.type == "cpu" else 2**30)

    def _live_model(self):
        from transformers import AutoModelForCausalLM

        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(self._config, dtype=self.dtype)
        model.eval().requires_grad_(False)
        gen = getattr(self.session.sources[self.plan.target], "generation_config", None)
        if gen is not None:
            model.generation_config = gen
        return model

    def resident_bytes(self) -> dict[str, int]:
        """Bytes actually held, per memory-plan category (device and host), plus the live model."""
        out = self.held.resident_bytes()
        out["live model"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return out

    # -- per candidate -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, recipe: Recipe):
        """Write the merge of `recipe` into the live model and return it; raises on NaN/inf weights."""
        plan = build_plan(recipe, self.layouts)
        if [t.out_name for t in plan.tensors] != [t.out_name for t in self.plan.tensors]:
            raise ConfigError("the candidate recipe does not have the structure of the run's template")
        method = plan.method
        if method != self.method and (method in GTA_METHODS) != self.held.gta:  # deltas serve the whole family
            raise ConfigError(f"the candidate's merge method '{method}' needs other resident tensors than the "
                              f"run's '{self.method}'")
        finite = True
        random = METHODS[method].random
        for tp in plan.tensors:
            if tp.vocab == "keep_target":
                continue
            param = self._params[tp.out_name]
            held = self.held.get(tp.out_name)
            n = len(tp.inputs) - (0 if tp.base_index is None else 1)
            gen = make_generator(recipe.options.seed, tp.out_name, self.device) if random else None
            if method in GTA_METHODS:
                params = resolve_params(method, plan.resolve(tp), n)
                if method != self.method:  # tables are the run method's: another one sorts / ranks per merge
                    held = HeldTensor(base=held.base, deltas=held.deltas, l1=held.l1)
                finite &= merge_gta(self.kernels, param, held, method, params, gen)
            elif method == "linear":
                params = resolve_params(method, plan.resolve(tp), n)
                assert held.sources is not None
                finite &= merge_linear(self.kernels, param, held.sources, params)
            else:
                assert held.sources is not None
                base = held.sources[tp.base_index] if tp.base_index is not None else None
                others = [t for i, t in enumerate(held.sources) if i != tp.base_index]
                param.copy_(merge_tensor(method, base, others, plan.resolve(tp), generator=gen))
                finite &= bool(torch.isfinite(param).all())
            if tp.out_name in self._rows:
                param.index_copy_(0, *self._rows[tp.out_name])
        if not finite:
            raise FloatingPointError("the merged weights contain NaN or inf")
        return self.model
