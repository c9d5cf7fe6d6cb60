"""The memory plan of a run, before it starts: from config files alone (meta device, no weights read).

Per device it counts the bytes of what stays resident during a search (the base, the experts' task vectors
"deltas", TIES threshold tables and the ranks of the elements tied at a threshold, DELLA's rank tables, the live
model the candidates are merged into), the merge pass's temporaries, and the evaluation's activations and KV
cache; then it picks the cheapest *exact* layout that fits the device (``plan_memory``). The experts themselves
are never kept: base + delta is all a task-vector method reads. Host offload is the last resort and is said
loudly by ``MemoryPlan.describe``.

``evomerge.merge.resident.ResidentMerger`` holds exactly this layout: it plans before loading (from the config,
with upper bounds for what only the weights can tell), loads, then plans again with the measured tie data
(``TieBytes``) and its ``resident_bytes()`` equal that plan's items byte for byte (tested).

Every constant below is documented where it is defined; the estimates are upper bounds of what a run
allocates at its peak, not measurements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

GiB = 2**30
# What torch reports as the total memory of an 80 GB H100 (HBM3), rounded: the nominal 80 GB less what the
# driver/ECC keep. The CUDA context is charged separately (RESERVE_BYTES), so this is the plan's budget.
H100_80GB_BYTES = int(79.2 * GiB)
# CUDA context, cuBLAS/cuDNN workspaces and caching-allocator fragmentation: about 0.5 GiB of context on an
# H100 plus as much again of slack.
RESERVE_BYTES = 1 * GiB
DENSITY_STEPS = 1000  # density grid of the search (0.001 steps), as merge.resident.FAST_TIES_STEPS
THRESHOLD_VALUES = DENSITY_STEPS + 1  # one threshold per grid density 0, 0.001, ..., 1 (an upper bound)
THRESHOLD_BYTES = 4  # thresholds are float32 (mergekit sorts |delta| as float32 on CPU; so do the tables)
# TIES ties: equal magnitudes at a grid threshold are common (bf16 always; float32 too: fine-tune deltas are small
# next to the weights, so they are coarsely quantized: 103 of 117 float32 delta tensors of a perturbed tiny Llama
# tie at some grid cut). Exactness needs mergekit's argsort order there, so the resident merger keeps, per delta
# with ties, the int32 flat indices of the tied elements mergekit drops (at most one per element, RANK_BYTES) and
# an int32 (start, end) pair per grid density (TIE_BOUND_BYTES). Only measurable after a sort: before loading the
# plan charges the upper bound; `TieBytes` carries the measured bytes.
RANK_BYTES = 4
TIE_BOUND_BYTES = 2 * 4 * THRESHOLD_VALUES
TIE_CUTOFF_BYTES = 8 * THRESHOLD_VALUES  # "thresholds" layout: an int64 flat-index cutoff per grid density
# Merge-pass temporaries per element of the largest tensor (merged one tensor at a time):
WORKSPACE_FIXED = 16  # float32 sign-election sum, float32 disjoint sum, float32 divisor, float32 result
WORKSPACE_PER_EXPERT_EXTRA = 1  # + per expert: a bool keep/drop mask, plus 2 x delta bytes (a weighted copy
#                                 of the task vector and a random draw / mask in the delta's dtype)
# Prefill activations per token, at the peak inside one decoder layer (SDPA/flash attention: no seq x seq
# score matrix): ACT_HIDDEN hidden-sized tensors (residual stream, normed input, attention output, its
# projection) and ACT_INTERMEDIATE intermediate-sized ones (gate, up, act(gate) * up), in the model dtype.
ACT_HIDDEN = 4
ACT_INTERMEDIATE = 3
# Logits only at scored positions: the head's output (model dtype) + its float32 copy + float32 log-softmax.
LOGIT_EXTRA_BYTES = 8
PCIE_BYTES_PER_S = 25e9  # pinned host -> device copy, PCIe 4.0 x16 in practice (for the offload warning)

TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                       "della", "della_linear")
THRESHOLD_METHODS = ("ties",)  # top-k cuts: a threshold table per grid density (+ the order of tied elements)
# breadcrumbs keep a band of ranks (two cuts): evomerge sorts per merge there, nothing beyond base + deltas is held
RANK_ONLY_METHODS = ("della", "della_linear")  # MagPrune's drop probability depends on each element's rank
# read the models, not deltas (every method of the registry outside TASK_VECTOR_METHODS: tested)
SOURCE_METHODS = ("linear", "slerp", "nuslerp", "model_stock", "passthrough", "arcee_fusion", "karcher", "multislerp",
                  "nearswap", "sce", "ram", "ramplus_tl")
HALF = ("bfloat16", "float16")


@dataclass(frozen=True)
class TieBytes:
    """Bytes of tie-breaking data, measured at load (one argsort per TIES delta; see RANK_BYTES).

    `exact`: mergekit's order of the tied elements it drops + per-delta bounds (the "ranks" item of the exact
    layout); `index`: flat-index cutoff tables of the deltas with ties (the "thresholds" layout, inexact)."""

    exact: int | None = None
    index: int | None = None


@dataclass(frozen=True)
class Item:
    key: str  # stable name: base, sources, deltas, thresholds, ranks, live model, workspace, activations, ...
    bytes: int
    label: str  # human text, e.g. "deltas (3 x bfloat16)"


@dataclass
class MemoryPlan:
    layout: str
    items: list[Item]  # on the device
    device_bytes: int
    total: int
    fits: bool
    offload: bool = False
    host_items: list[Item] = field(default_factory=list)  # pinned host memory (offload only)
    stream_bytes: int = 0  # host -> device per candidate (offload only)
    model_bytes: int = 0  # one copy of the model in the run's dtype
    n_params: int = 0
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # layouts tried first and why they were not taken

    def __getitem__(self, key: str) -> int:
        for it in self.items + self.host_items:
            if it.key == key:
                return it.bytes
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return any(it.key == key for it in self.items + self.host_items)

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "device_bytes": self.device_bytes, "total": self.total, "fits": self.fits,
                "offload": self.offload, "stream_bytes": self.stream_bytes, "model_bytes": self.model_bytes,
                "items": {it.key: it.bytes for it in self.items},
                "host_items": {it.key: it.bytes for it in self.host_items}, "notes": list(self.notes)}

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        width = max(len(it.label) for it in self.items + self.host_items)
        lines = [f"memory plan: {self.layout} ({self.n_params:,} parameters, {self.dtype})"]
        lines += [f"  {it.label:<{width}} {g(it.bytes)}" for it in self.items]
        lines.append(f"  {'total on the device':<{width}} {g(self.total)}  of {g(self.device_bytes).strip()}"
                     f"  ({'fits' if self.fits else 'DOES NOT FIT'})")
        if self.offload:
            secs = self.stream_bytes / PCIE_BYTES_PER_S
            lines.append("  !!! HOST OFFLOAD: the resident weights do not fit on the device !!!")
            lines += [f"  !!! in pinned host memory: {it.label} {g(it.bytes).strip()}" for it in self.host_items]
            lines.append(f"  !!! {g(self.stream_bytes).strip()} stream host -> device for EVERY candidate "
                         f"(~{secs:.1f} s at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s): expect a much slower search !!!")
        if not self.fits:
            lines.append(f"  DOES NOT FIT: {g(self.total - self.device_bytes).strip()} over the device's memory even "
                         "with everything offloadable on the host; use a bigger device or smaller batches")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  not taken: {r}" for r in self.rejected]
        return "\n".join(lines)


def _cfg(config, key: str, default=None):
    v = getattr(config, key, None)
    if v is None and getattr(config, "text_config", None) is not None:
        v = getattr(config.text_config, key, None)
    return default if v is None else v


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors save_pretrained would write (tied embeddings once), from a meta-device model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = {n: tuple(p.shape) for n, p in model.named_parameters()}  # unique: tied weights appear once
    state = model.state_dict()
    out.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in state})  # persistent buffers
    return out


def load_config(path_or_config_json: str | Path):
    """A transformers config from a model folder or a config.json file (no weights, no hub)."""
    from transformers import AutoConfig

    path = Path(path_or_config_json)
    if path.is_dir():
        path = path / "config.json"
    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "float32"
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype '{dtype}'")
    return name


def _itemsize(name: str) -> int:
    return getattr(torch, name).itemsize


def plan_memory(config, *, n_experts: int, method: str, dtype: str | torch.dtype | None = None,
                device_bytes: int = H100_80GB_BYTES, batch_tokens: int = 16384, max_batch: int | None = None,
                max_new_tokens: int = 32, max_seq_len: int = 2048, scored_positions: int | None = None,
                ties_exact: Literal["auto", "ranks", "thresholds", "sort"] = "auto", reserve_bytes: int = RESERVE_BYTES,
                shapes: dict[str, tuple[int, ...]] | None = None, ties: TieBytes | None = None,
                device_type: str = "cuda", offload: Literal["auto", "never", "always"] = "auto") -> MemoryPlan:
    """Plan a run's device memory from `config` alone and pick the cheapest exact layout that fits.

    `dtype`: the run's dtype (sources are held and merged in it; default the config's); `max_batch`: rows of a
    generation batch (default as GenPlan packs them: batch_tokens // (max_seq_len + max_new_tokens));
    `scored_positions`: positions the LM head runs at in one batch (default max_batch); `shapes`: reuse
    `param_shapes(config)`.

    TIES (`ties_exact`): "auto" (or "ranks") = exact, threshold tables + mergekit's order of the tied elements, if
    it fits, else "thresholds" = threshold tables with ties broken by flat index (inexact where magnitudes tie);
    "sort" = nothing beyond base + deltas (mergekit's argsort on every merge). `ties`: the tie
    bytes measured at load (default: upper bounds). `device_type`: "cpu" or "cuda"; DELLA's tables are in its
    work dtype, float32 for float16 on CPU as in mergekit. `offload`: "never" keeps everything on the device
    (the plan may not fit), "always" puts everything offloadable on the host (the preferred exact layout).
    """
    if method not in TASK_VECTOR_METHODS + SOURCE_METHODS:
        raise ValueError(f"unknown merge method '{method}' (known: {', '.join(TASK_VECTOR_METHODS + SOURCE_METHODS)})")
    if ties_exact not in ("auto", "ranks", "thresholds", "sort"):
        raise ValueError(f"ties_exact must be auto, ranks, thresholds or sort, not '{ties_exact}'")
    dt = _dtype_name(dtype or _cfg(config, "dtype") or _cfg(config, "torch_dtype"))
    size = _itemsize(dt)
    shapes = param_shapes(config) if shapes is None else shapes
    numels = [_numel(s) for s in shapes.values()]
    n_params = sum(numels)
    model = n_params * size
    delta_dt = dt  # deltas are computed (and held) in the run's dtype, exactly as the merge computes them
    dsize = _itemsize(delta_dt)

    # runtime: merge temporaries, evaluation activations and KV cache, context reserve
    hidden, vocab = int(_cfg(config, "hidden_size")), int(_cfg(config, "vocab_size"))
    inter = int(_cfg(config, "intermediate_size", 4 * hidden))
    layers, heads = int(_cfg(config, "num_hidden_layers")), int(_cfg(config, "num_attention_heads"))
    kv_heads = int(_cfg(config, "num_key_value_heads", heads))
    head_dim = int(_cfg(config, "head_dim", hidden // heads))
    rows = max_batch if max_batch is not None else max(1, batch_tokens // (max_seq_len + max_new_tokens))
    scored = scored_positions if scored_positions is not None else rows
    ws_per = WORKSPACE_FIXED + n_experts * (2 * dsize + WORKSPACE_PER_EXPERT_EXTRA)
    runtime = [
        Item("workspace", max(numels) * ws_per, f"workspace (largest tensor x {ws_per} B)"),
        Item("activations", batch_tokens * size * (ACT_HIDDEN * hidden + ACT_INTERMEDIATE * inter)
             + scored * vocab * (size + LOGIT_EXTRA_BYTES), f"activations ({batch_tokens} tokens, {scored} scored)"),
        Item("KV cache", 2 * layers * kv_heads * head_dim * rows * (max_seq_len + max_new_tokens) * size,
             f"KV cache ({rows} x {max_seq_len + max_new_tokens} tokens)"),
        Item("reserve", reserve_bytes, "CUDA context + allocator slack"),
    ]

    # resident weights: (item, offload level): level 1 goes to the host first, then 2, then 3; 0 never
    notes: list[str] = []
    if method in SOURCE_METHODS:
        weights = [(Item("sources", (n_experts + 1) * model, f"sources ({n_experts + 1} x {dt}, {method} reads "
                         "the models, not deltas)"), 1)]
        sparsify = ["none"]
    else:
        weights = [(Item("base", model, "base (resident)"), 3),
                   (Item("deltas", n_experts * n_params * dsize, f"deltas ({n_experts} x {delta_dt})"), 2)]
        if method in RANK_ONLY_METHODS:
            sparsify = ["ranks"]
        elif method not in THRESHOLD_METHODS or ties_exact == "sort":
            sparsify = ["none"]  # dare_* draw random masks; task_arithmetic keeps everything; breadcrumbs sort
        elif ties_exact == "thresholds":
            sparsify = ["thresholds"]
        else:  # auto / ranks: exact first; threshold tables with flat-index ties before any host offload
            sparsify = ["tied ranks", "thresholds"]
    live = Item("live model", model, f"live model ({dt})")
    n_deltas = n_experts * len(shapes)
    tables = n_deltas * THRESHOLD_VALUES * THRESHOLD_BYTES
    label = f"{'TIES' if method == 'ties' else 'magnitude'} thresholds"
    thresholds = (Item("thresholds", tables, f"{label} ({n_experts} x {len(shapes)} tensors x "
                       f"{THRESHOLD_VALUES} float32)"), 0)
    ties = ties or TieBytes()
    tied_exact = n_experts * n_params * RANK_BYTES + n_deltas * TIE_BOUND_BYTES if ties.exact is None else ties.exact
    tied_index = n_deltas * TIE_CUTOFF_BYTES if ties.index is None else ties.index
    work = dt if (device_type != "cpu" or dt == "bfloat16") else "float32"  # mergekit's DELLA work dtype
    extra = {"none": [], "thresholds": [thresholds], "tied ranks": [thresholds],
             "ranks": [(Item("ranks", n_experts * n_params * _itemsize(work),
                             f"ranks ({n_experts} x {work} per element)"), 1)]}
    if tied_exact:
        how = "at most" if ties.exact is None else "measured"
        extra["tied ranks"].append((Item("ranks", tied_exact, f"ranks of tied elements ({how}, int32)"), 1))
    if tied_index:
        how = "at most" if ties.index is None else "measured"
        extra["thresholds"].append((Item("tie cutoffs", tied_index, f"tie cutoffs ({how}, int64)"), 1))
    # on the device first (preferred exactness first), then offload level by level, cheapest to stream
    candidates = [(sp, 0) for sp in sparsify]
    candidates += [(sparsify[-1], lv) for lv in sorted({lv for _, lv in weights + extra[sparsify[-1]] if lv})]
    if offload == "never":
        candidates = [(sp, 0) for sp in sparsify]
    elif offload == "always":
        candidates = [(sparsify[0], max(lv for _, lv in weights + extra[sparsify[0]]))]
    rejected: list[str] = []
    plan: MemoryPlan | None = None
    for sp, level in candidates:
        held = weights + extra[sp]
        dev = [it for it, lv in held if not 0 < lv <= level] + [live] + runtime
        host = [it for it, lv in held if 0 < lv <= level]
        total = sum(it.bytes for it in dev)
        shown = {"none": "", "tied ranks": ", thresholds + tied ranks"}.get(sp, f", {sp}")
        name = ("sources" if method in SOURCE_METHODS else "base + deltas") + shown
        if host:
            name += ", host offload of " + " and ".join(it.key for it in host)
        if plan is not None:
            rejected.append(f"{plan.layout}: {plan.total / GiB:.2f} GiB > {device_bytes / GiB:.2f} GiB")
        plan = MemoryPlan(name, dev, device_bytes, total, total <= device_bytes, offload=bool(host),
                          host_items=host, stream_bytes=sum(it.bytes for it in host), model_bytes=model,
                          n_params=n_params, dtype=dt, notes=notes, rejected=rejected)
        if plan.fits:
            break
    assert plan is not None
    if method in THRESHOLD_METHODS and ", thresholds" in plan.layout and "tied ranks" not in plan.layout:
        why = "as asked" if ties_exact == "thresholds" else "the ranks of tied elements do not fit"
        notes.append(f"threshold tables for {delta_dt} deltas ({why}): equal magnitudes at the cut are broken by "
                     "flat index, where mergekit breaks them by its argsort order")
    if "tied ranks" in plan.layout:
        notes.append("ranks of tied elements: mergekit's own order among equal magnitudes at a cut, bit for bit")
    return plan


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan_from_folder(path_or_config_json: str | Path, **kwargs) -> MemoryPlan:
    """`plan_memory` for a model folder (or its config.json) without reading any weights."""
    return plan_memory(load_config(path_or_config_json), **kwargs)
