"""mergekit's examples/ folder as a test corpus: tiny-model versions of its example recipes (same keys, gradients,
filters, dtypes and slice shapes; model names replaced by tiny Llamas of 4 layers) go through `evomerge merge`
(the CLI) and mergekit's run_merge from the same YAML text, and the two output folders must hold the same tensors
bit for bit (measured: every example is bit-equal, float16, bfloat16 and float32 alike), the same layer count and
a tokenizer.

Slice ranges are scaled down: 40 layers -> 4 (`orcamini-platy-44layer`: [0, 24] + [20, 40] of 40 -> [0, 3] + [1, 4]
of 4, the same overlapping stack). One example per method that mergekit 0.1.5 added after those (karcher,
multislerp, nearswap, sce, ram, ramplus_tl), written in the examples' style.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main as evomerge_main

EXAMPLES = {
    "linear.yml": """
models:
  - model: ${orca}
    parameters:
      weight: 1.0
  - model: ${wizardlm}
    parameters:
      weight: 0.3
  - model: ${platypus}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "ties.yml": """
models:
  - model: ${orca}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: ${platypus}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: ${wizardmath}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ${llama2}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "bio-merge.yml": """
models:
  - model: ${mistral_instruct}
    parameters:
      density: 0.5
      weight: 0.5
  - model: ${biomistral}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: ${mistral}
parameters:
  normalize: false
  int8_mask: true
dtype: bfloat16
""",
    "gradient-slerp.yml": """
slices:
  - sources:
      - model: ${orca}
        layer_range: [0, 4]
      - model: ${platypus}
        layer_range: [0, 4]
merge_method: slerp
base_model: ${orca}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "orcamini-platy-44layer.yml": """
slices:
  - sources:
      - model: ${orca}
        layer_range: [0, 3]
  - sources:
      - model: ${platypus}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""",
    "arcee_fusion.yml": """
models:
  - model: ${virtuoso}
  - model: ${virtuoso_v2}
merge_method: arcee_fusion
base_model: ${virtuoso}
dtype: bfloat16
""",
    "karcher.yml": """
models:
  - model: ${orca}
  - model: ${wizardlm}
  - model: ${platypus}
merge_method: karcher
parameters:
  max_iter: 20
  tol: 1.0e-6
dtype: bfloat16
""",
    "multislerp.yml": """
models:
  - model: ${orca}
    parameters:
      weight: [0.2, 0.5, 0.8]
  - model: ${wizardlm}
    parameters:
      weight: 0.3
merge_method: multislerp
base_model: ${llama2}
dtype: bfloat16
""",
    "nearswap.yml": """
models:
  - model: ${orca}
  - model: ${platypus}
merge_method: nearswap
base_model: ${orca}
parameters:
  t:
    - filter: self_attn
      value: [0.0001, 0.0005]
    - value: 0.0003
dtype: float32
""",
    "sce.yml": """
models:
  - model: ${orca}
  - model: ${wizardlm}
  - model: ${platypus}
merge_method: sce
base_model: ${llama2}
parameters:
  select_topk: [0.3, 0.8]
dtype: bfloat16
""",
    "ram.yml": """
models:
  - model: ${orca}
  - model: ${wizardlm}
  - model: ${platypus}
merge_method: ram
base_model: ${llama2}
parameters:
  epsilon: 0.0004
dtype: float32
""",
    "ramplus_tl.yml": """
models:
  - model: ${orca}
  - model: ${wizardlm}
  - model: ${platypus}
merge_method: ramplus_tl
base_model: ${llama2}
parameters:
  r: 0.5
  alpha: [0.1, 0.6]
  epsilon: 0.0004
out_dtype: bfloat16
dtype: float32
""",
}
FLOAT32_KERNELS = ("arcee_fusion", "ramplus_tl")  # mergekit writes their float32 results unless out_dtype is set
_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _names(family: dict) -> dict[str, str]:
    """Each example's model names -> a tiny model (the base plays every base model)."""
    base, a, b, c = (str(family[k]) for k in ("base", "a", "b", "c"))
    return {"llama2": base, "mistral": base, "virtuoso": base, "orca": a, "mistral_instruct": a, "virtuoso_v2": a,
            "platypus": b, "biomistral": b, "wizardlm": c, "wizardmath": c}


def _ulps(mine: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest difference in units in the last place of `dtype` (for the failure message)."""
    spacing = torch.pow(2.0, torch.floor(torch.log2(ref.float().abs().clamp_min(torch.finfo(dtype).tiny)))
                        - _MANTISSA[dtype])
    return float(((mine.float() - ref.float()).abs() / spacing).max())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_example_equals_mergekit(example, llama_family, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = EXAMPLES[example]
    for key, path in _names(llama_family).items():
        text = text.replace("${" + key + "}", path)
    recipe_file = tmp_path / example
    recipe_file.write_text(text)
    assert evomerge_main(["merge", str(recipe_file), str(tmp_path / "ours"), "--quiet"]) == 0
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=True, quiet=True))

    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "mk")
    assert set(ours) == set(theirs)
    config = yaml.safe_load(text)
    dtype = getattr(torch, config.get("out_dtype") or config["dtype"])
    for name, ref in theirs.items():
        mine = ours[name]
        assert mine.dtype == dtype, name
        if ref.dtype != dtype:  # a float32 kernel without out_dtype: mergekit's result, rounded once
            assert config["merge_method"] in FLOAT32_KERNELS and "out_dtype" not in config, name
            ref = ref.to(dtype)
        assert torch.equal(mine, ref), f"{example} {name}: {_ulps(mine, ref, dtype):g} ulp from mergekit"
    n_layers = json.loads((tmp_path / "mk" / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == n_layers
    assert (tmp_path / "ours" / "tokenizer.json").exists() and (tmp_path / "mk" / "tokenizer.json").exists()
