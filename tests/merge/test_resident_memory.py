"""The resident merger holds exactly what the memory plan says (measured bytes == plan bytes), never the experts
when deltas suffice, and merges with scratch memory bounded by a few tensors, not by the model."""

from __future__ import annotations

import os
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from evomerge.merge import fused
from evomerge.merge.resident import ResidentMerger
from evomerge.recipe import Recipe

RESIDENT_KEYS = ("base", "deltas", "sources", "thresholds", "ranks", "tie cutoffs", "live model")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """base + 2 experts, 8 layers, largest tensor 128 x 512 (the MLP); the model is ~30x its largest tensor."""
    from evomerge.models.tiny import make_family

    root = tmp_path_factory.mktemp("memfam")
    return make_family(root, "llama", names=("base", "a", "b"), num_layers=8, hidden=128, intermediate=512)


def _recipe(fam, method, dtype="float32", **options) -> Recipe:
    models = [{"model": str(fam[m]), "parameters": {"weight": w, "density": d}}
              for m, w, d in (("a", [0.4, 0.9], 0.45), ("b", 0.7, 0.3))]  # on the 0.001 grid, as the search
    for m in models:
        if method in ("task_arithmetic", "linear"):
            m["parameters"].pop("density")
        if method.startswith("della"):
            m["parameters"]["epsilon"] = 0.1
    return Recipe.from_dict({"merge_method": method, "base_model": None if method == "linear" else str(fam["base"]),
                             "models": models, "dtype": dtype, "evomerge": {"seed": 3, **options}})


@pytest.mark.parametrize("method,dtype,fast_ties", [
    ("ties", "float32", "argsort"), ("ties", "bfloat16", "argsort"), ("ties", "float32", "index"),
    ("dare_ties", "bfloat16", "argsort"), ("della", "float32", "argsort"), ("task_arithmetic", "float32", "argsort"),
    ("linear", "bfloat16", "argsort"),
])
def test_resident_bytes_equal_the_memory_plan(fam, method, dtype, fast_ties):
    merger = ResidentMerger(_recipe(fam, method, dtype), fast_ties=fast_ties, fused="eager")
    held, plan = merger.resident_bytes(), merger.memory_plan
    planned = {k: plan[k] for k in RESIDENT_KEYS if k in plan}
    assert held == planned, plan.describe()
    model = planned["live model"]
    if method == "linear":
        assert held["sources"] == 2 * model  # linear reads the models themselves
    else:
        assert "sources" not in held and held["base"] == model and held["deltas"] == 2 * model  # never the experts
        for held_tensor in merger.held.tensors.values():
            assert all(d.dtype == merger.dtype for d in held_tensor.deltas)  # bfloat16 sources: bfloat16 deltas
    if method == "ties":
        assert held["thresholds"] == 2 * len(merger.plan.tensors) * 1001 * 4
        assert ("ranks" in held) == (fast_ties == "argsort") and ("tie cutoffs" in held) == (fast_ties == "index")
    if method == "della":
        assert held["ranks"] == 2 * model  # float32 rank tables (DELLA's work dtype)


def test_a_plan_that_does_not_fit_is_said_loudly(fam, monkeypatch):
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_PHYS_PAGES" else 4096)  # a 4 KiB "device"
    with pytest.warns(ResourceWarning, match="do not fit"):
        merger = ResidentMerger(_recipe(fam, "ties"), fused="eager")
    assert not merger.memory_plan.fits
    assert "DOES NOT FIT" in merger.memory_plan.describe()
    merger.merge(_recipe(fam, "ties"))  # still merges (CPU: nothing to offload to)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that torch ops allocate inside the mode and that are still alive.

    Every op's outputs are inspected: a storage that none of the op's inputs owns is a new allocation (views and
    in-place results share an input's storage and are not); it counts until the last tensor viewing it is
    garbage (weakref.finalize on each tensor). tracemalloc cannot see torch's allocator, and CPU torch has no
    allocator statistics; this sees every Python-visible tensor, which is what a merge could keep alive.
    (Inside a dispatch mode torch.compile'd code runs eagerly, so this measures the eager path.)"""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        owned = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or (ptr in owned and ptr not in self.live):
                continue
            if ptr not in self.live:
                self.live[ptr] = [storage.nbytes(), 0]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.live[ptr][1] += 1
            weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.current -= entry[0]


def _largest(merger) -> int:
    return max(p.numel() * p.element_size() for p in merger.model.parameters())


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "task_arithmetic", "linear"])
def test_merge_scratch_is_a_few_tensors_not_the_model(fam, method, monkeypatch):
    """Fails if a merge keeps merged tensors (e.g. builds a merged state dict, then copies) or any per-model
    temporary: the model is ~30x its largest tensor, the bound is 6x (DARE/DELLA keep each model's masked delta
    of one tensor until the fused pass, + the mask and its draw)."""
    monkeypatch.setattr(fused, "CHUNK", 4096)  # eager chunks well below the largest tensor (real models: 64K
    merger = ResidentMerger(_recipe(fam, method), fused="eager")  # elements next to tensors of 10M+)
    model_bytes = sum(p.numel() * p.element_size() for p in merger.model.parameters())
    assert model_bytes > 25 * _largest(merger)
    merger.merge(_recipe(fam, method))  # warm-up: lazy imports, caches
    tracker = LiveBytes()
    with tracker:
        merger.merge(_recipe(fam, method))
    print(f"{method}: peak scratch {tracker.peak} B = {tracker.peak / _largest(merger):.2f} x the largest tensor")
    assert 0 < tracker.peak <= 6 * _largest(merger), (tracker.peak, _largest(merger))


def _rss_peak_kib() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]), int(fields["VmRSS"].split()[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_compiled_merge_peak_rss_is_a_few_tensors(tmp_path_factory):
    """The compiled path, which a dispatch mode cannot see into: the process's peak resident memory (VmHWM,
    reset through /proc/self/clear_refs) during a merge, minus the resident memory before it. Big tensors (4 MiB)
    so that allocator noise is small next to them; the model is 15x its largest tensor, the bound 3x."""
    from evomerge.models.tiny import make_family

    if not fused.compile_available():
        pytest.skip("torch.compile is not available")
    big = make_family(tmp_path_factory.mktemp("bigfam"), "llama", names=("base", "a", "b"), num_layers=4,
                      hidden=512, intermediate=2048, heads=8, kv_heads=4)
    merger = ResidentMerger(_recipe(big, "ties"), fused="compile")
    merger.merge(_recipe(big, "ties"))  # compiles
    assert merger.kernels.mode == "compile"
    largest = _largest(merger)
    model_bytes = sum(p.numel() * p.element_size() for p in merger.model.parameters())
    assert model_bytes > 12 * largest
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _, before = _rss_peak_kib()
    merger.merge(_recipe(big, "ties"))
    peak, _ = _rss_peak_kib()
    extra = (peak - before) * 1024
    print(f"compiled TIES: peak RSS increase {extra} B = {extra / largest:.2f} x the largest tensor")
    assert extra <= 3 * largest, (extra, largest)
