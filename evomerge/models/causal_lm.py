"""A live causal LM for evaluation, built from a weight source (its own copy of the weights)."""

from __future__ import annotations

from typing import Any

import torch

from evomerge.errors import ModelLoadError
from evomerge.models.sources import SafetensorsSource, WeightSource, _short, open_model


def load_causal_lm(ref: "str | WeightSource", *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   trust_remote_code: bool = False):
    """(model, tokenizer) ready for evaluation: eval mode, `dtype`, on `device`, its own copy of the weights."""
    from transformers import AutoModelForCausalLM

    src = ref if isinstance(ref, WeightSource) else open_model(ref, trust_remote_code=trust_remote_code)
    trust = trust_remote_code or src.trust_remote_code
    try:
        if isinstance(src, SafetensorsSource) and src.standard_layout:
            model = AutoModelForCausalLM.from_pretrained(str(src.path), dtype=dtype, trust_remote_code=trust)
        else:  # GGUF / legacy .bin: build from the tensors already read (never unpickle arbitrary objects)
            model = _model_from_state(src, dtype, trust)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"'{src.ref}': transformers cannot load it as a causal LM ({_short(exc)})") from None
    try:
        model = model.to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) hides the bound self
    except Exception as exc:
        raise ModelLoadError(f"'{src.ref}': cannot move it to {device} ({_short(exc)})") from None
    return model.eval(), src.tokenizer()


def _model_from_state(src: WeightSource, dtype: torch.dtype, trust: bool):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    state = {n: src.get(n, dtype=dtype) for n in src.keys()}
    # Any: transformers types the mapping's values as (slow, fast) tokenizer pairs (a model mapping holds one
    # class) and from_pretrained's result as the model (with output_loading_info it is a (model, info) pair)
    cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(src.config), None)
    if cls is not None:  # from_pretrained with a state dict: no random init, ties and buffers done properly
        model, info = cls.from_pretrained(None, config=src.config, state_dict=state, dtype=dtype,
                                          output_loading_info=True)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    else:  # remote-code models: their class is only reachable through the auto factory
        model = AutoModelForCausalLM.from_config(src.config, dtype=dtype, trust_remote_code=trust)
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        tied = _tied_names(model)
        missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ModelLoadError(f"'{src.ref}': its weights do not fit its config "
                             f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share their tensor with another name (tied embeddings)."""
    params = list(model.named_parameters(remove_duplicate=False))
    return {n for n, p in params if sum(1 for _, q in params if q is p) > 1}
