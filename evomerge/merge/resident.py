"""Device-resident merging for the search: source weights are read once, each candidate is merged in place
into one live transformers model. Nothing goes to disk per candidate.

The numerics are those of `evomerge merge` (the same planner and the same pure merge functions); TIES
additionally has a fast path that trims by thresholds precomputed once per run (`fast_ties`). Mode
'argsort' (default) stores mergekit's argsort rank of every delta element (4 bytes each) and keeps the
very subset mergekit keeps, bit for bit; mode 'index' stores nothing extra and differs only where several
elements share the threshold magnitude (common in bf16, and in float32 deltas of tensors near 1.0 such as
norm weights); 'off' uses the exact sort-per-merge path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.dtypes import DTYPES
from evomerge.errors import ConfigError, ModelLoadError
from evomerge.merge.execute import compute_tensor
from evomerge.merge.fast_ties import MagnitudeThresholds, ties_merge_fast
from evomerge.merge.plan import MergePlan, TensorPlan, build_plan
from evomerge.merge.session import MergeSession
from evomerge.recipe import Recipe

FAST_TIES_STEPS = 1000  # density grid 0.001, the search space's default for densities


@dataclass
class MergeStats:
    resident_bytes: int
    offloaded: bool
    fast_ties: bool


class ResidentMerger:
    """Holds every input tensor of a recipe's plan on `device` (or pinned CPU memory) for a whole run."""

    def __init__(self, template: Recipe, *, device: str = "cpu", offload: str = "auto", fast_ties: str = "argsort",
                 source: str = "<space>", session: MergeSession | None = None):
        self.session = session or MergeSession.open(template, device="cpu", source=source)
        self.layouts = self.session.layouts
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", file=source, key="device", allowed="cpu")
        self.dtype = DTYPES[template.dtype or "float32"]
        self.template = template
        self.plan = build_plan(template, self.layouts, source=source)
        self.offloaded = self._should_offload(offload)
        store_device = torch.device("cpu") if self.offloaded else self.device
        if fast_ties not in ("argsort", "index", "off"):
            raise ConfigError(f"unknown fast_ties mode '{fast_ties}'", file=source, key="fast_ties",
                              allowed="argsort, index, off")
        self.tie_break = fast_ties
        self.fast = fast_ties != "off" and template.merge_method == "ties" and template.options.embeddings != "align"
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        self._thresholds: dict[tuple[str, str], MagnitudeThresholds] = {}
        self._load(store_device)
        self.model = self._live_model()
        self._params = dict(self.model.named_parameters())
        missing = [tp.out_name for tp in self.plan.tensors if tp.out_name not in self._params]
        if missing:
            raise ModelLoadError(f"the live model has no parameter {missing[0]}", file=source)

    # -- set-up --------------------------------------------------------------------------------------
    def _input_keys(self) -> set[tuple[str, str]]:
        keys = set()
        for tp in self.plan.tensors:
            if tp.vocab == "keep_target":
                keys.add((self.plan.target, tp.out_name))
            else:
                keys.update((i.model, i.name) for i in tp.inputs)
                if tp.vocab == "align":
                    keys.add((self.plan.target, tp.out_name))
        return keys

    def _should_offload(self, offload: str) -> bool:
        if offload == "always":
            return True
        if offload == "never" or self.device.type != "cuda":
            return False
        needed = sum(self.session.sources[m].shape(n).numel() for m, n in self._input_keys()) * self.dtype.itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        return needed > 0.7 * free

    def _load(self, store_device: torch.device) -> None:
        pin = store_device.type == "cpu" and self.device.type == "cuda"
        for model, name in sorted(self._input_keys()):
            t = self.session.fetch(model, name).to(store_device)
            self._tensors[(model, name)] = t.pin_memory() if pin else t
        if self.fast:  # deltas and magnitude thresholds, once per run
            for tp in self.plan.tensors:
                if tp.base_index is None or tp.vocab != "merge":
                    continue
                base = self._tensors[(tp.inputs[tp.base_index].model, tp.inputs[tp.base_index].name)]
                for i, inp in enumerate(tp.inputs):
                    if i == tp.base_index:
                        continue
                    key = (inp.model, inp.name)
                    if key not in self._deltas:
                        delta = self._tensors[key].to(self.device) - base.to(self.device)
                        self._thresholds[key] = MagnitudeThresholds(delta, steps=FAST_TIES_STEPS,
                                                                    tie_break=self.tie_break)
                        self._deltas[key] = delta.to(store_device)
        self.stats = MergeStats(sum(t.numel() * t.element_size() for t in self._tensors.values())
                                + sum(t.numel() * t.element_size() for t in self._deltas.values()),
                                self.offloaded, self.fast)

    def _live_model(self):
        from transformers import AutoModelForCausalLM

        from evomerge.merge.materialize import output_config

        cfg = output_config(self.plan, self.session.sources, str(self.dtype).removeprefix("torch."))
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=self.dtype)
        model.eval().requires_grad_(False)
        tok_src = self.session.sources[self.plan.target]
        gen = getattr(tok_src, "generation_config", None)
        if gen is not None:
            model.generation_config = gen
        return model

    # -- per candidate -------------------------------------------------------------------------------
    def fetch(self, model: str, name: str) -> torch.Tensor:
        return self._tensors[(model, name)].to(self.device, non_blocking=True)

    @torch.no_grad()
    def merge(self, recipe: Recipe):
        """Write the merge of `recipe` into the live model and return it; raises on NaN/inf weights."""
        plan = build_plan(recipe, self.layouts)
        if [t.out_name for t in plan.tensors] != [t.out_name for t in self.plan.tensors]:
            raise ConfigError("the candidate recipe does not have the structure of the run's template")
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for tp in plan.tensors:
            param = self._params[tp.out_name]
            if self.fast and tp.base_index is not None and tp.vocab == "merge":
                self._fast_ties(plan, tp, param)
            else:
                param.copy_(compute_tensor(plan, tp, self.fetch))
            finite &= torch.isfinite(param).all()
        if not bool(finite):
            raise FloatingPointError("the merged weights contain NaN or inf")
        return self.model

    def _fast_ties(self, plan: MergePlan, tp: TensorPlan, param: torch.Tensor) -> None:
        from evomerge.merge.registry import resolve_params

        others = [(i.model, i.name) for j, i in enumerate(tp.inputs) if j != tp.base_index]
        params = resolve_params("ties", plan.resolve(tp), len(others))
        assert tp.base_index is not None  # TIES needs a base; the plan checked it
        base_key = (tp.inputs[tp.base_index].model, tp.inputs[tp.base_index].name)
        ties_merge_fast(
            self.fetch(*base_key), [self._deltas[k].to(self.device, non_blocking=True) for k in others],
            [self._thresholds[k] for k in others], params["weight"], params["density"],
            lambda_=params["lambda"], normalize=params["normalize"], out=param,
        )
