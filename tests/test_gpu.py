"""CUDA paths (skipped without a GPU; CI has none). Each has a CPU twin elsewhere in the suite."""

from __future__ import annotations

import pytest
import torch

from evomerge.recipe import Recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _recipe(fam, method="ties") -> Recipe:
    return Recipe.from_dict({
        "merge_method": method, "base_model": str(fam["base"]), "dtype": "float32", "evomerge": {"seed": 1},
        "models": [{"model": str(fam["a"]), "parameters": {"weight": [0.2, 0.9], "density": 0.4}},
                   {"model": str(fam["b"]), "parameters": {"weight": 0.7, "density": [0.3, 0.8]}}]})


@pytest.mark.parametrize("offload", ["never", "always"])
def test_resident_merge_on_cuda_equals_cpu(llama_family, offload):
    from evomerge.merge.resident import ResidentMerger

    recipe = _recipe(llama_family)
    cpu = ResidentMerger(recipe, device="cpu").merge(recipe).state_dict()
    gpu = ResidentMerger(recipe, device="cuda", offload=offload).merge(recipe).state_dict()
    for name, value in cpu.items():
        assert (gpu[name].cpu() - value).abs().max() <= 1e-6, name


def test_materialize_on_cuda(llama_family, tmp_path):
    from safetensors.torch import load_file

    from evomerge.merge.materialize import materialize

    recipe = _recipe(llama_family)
    a = load_file(str(materialize(recipe, tmp_path / "cpu", progress=False) / "model.safetensors"))
    b = load_file(str(materialize(recipe, tmp_path / "gpu", device="cuda", progress=False) / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
