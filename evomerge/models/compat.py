"""Can these models be merged tensor by tensor? Architecture, hidden size, layer counts, shapes;
a vocabulary-size difference alone is the chat-vector case, handled by an embedding policy."""

from __future__ import annotations

import logging

from evomerge.errors import ModelLoadError
from evomerge.models.layout import ModelLayout, ParamKind
from evomerge.models.sources import WeightSource

log = logging.getLogger(__name__)


def check_mergeable(sources: dict[str, WeightSource], *, same_layers: bool = False,
                    allow_vocab_mismatch: bool = True) -> None:
    """Raise ModelLoadError, naming both models, when the models cannot be merged tensor by tensor.

    A difference in the vocabulary dimension of embeddings / lm_head alone is the vocab-mismatch case
    (handled by `evomerge.models.vocab`): it passes unless `allow_vocab_mismatch` is False.
    """
    items = list(sources.items())
    if len(items) < 2:
        return
    ref_name, ref_src = items[0]
    ref_cfg = ref_src.config
    ref_layout = ModelLayout.from_source(ref_src)
    for name, src in items[1:]:
        cfg = src.config
        pair = f"'{ref_name}' and '{name}'"
        a_type, b_type = getattr(ref_cfg, "model_type", None), getattr(cfg, "model_type", None)
        a_arch, b_arch = getattr(ref_cfg, "architectures", None), getattr(cfg, "architectures", None)
        if a_type != b_type or (a_arch and b_arch and list(a_arch) != list(b_arch)):
            raise ModelLoadError(f"{pair} have different architectures ({a_type} {a_arch or ''} vs "
                                 f"{b_type} {b_arch or ''})".replace(" )", ")"))
        a_h, b_h = _hidden(ref_cfg), _hidden(cfg)
        if a_h != b_h:
            raise ModelLoadError(f"{pair} have different hidden sizes ({a_h} vs {b_h})")
        layout = ModelLayout.from_source(src)
        if same_layers and ref_layout.num_layers != layout.num_layers:
            raise ModelLoadError(f"{pair} have different layer counts ({ref_layout.num_layers} vs "
                                 f"{layout.num_layers}); use slices with layer ranges to merge them")
        shared = [n for n in ref_src.keys() if n in src]
        for n in shared:
            sa, sb = ref_src.shape(n), src.shape(n)
            if sa == sb:
                continue
            kind = ref_layout.kind_of(n)
            vocab_rows = _vocab_rows(ref_cfg, sa[0]) and _vocab_rows(cfg, sb[0])
            if kind in (ParamKind.EMBED, ParamKind.LM_HEAD) and vocab_rows and len(sa) == len(sb) and sa[1:] == sb[1:]:
                if not allow_vocab_mismatch:
                    raise ModelLoadError(f"{pair} have different vocabularies ('{n}': {sa[0]} vs {sb[0]} rows); "
                                         "choose an embedding policy", allowed="keep_target, align")
                log.info("%s: vocabulary sizes differ on %s (%d vs %d rows)", pair, n, sa[0], sb[0])
                continue
            raise ModelLoadError(f"{pair} differ in the shape of '{n}' ({tuple(sa)} vs {tuple(sb)})")


def _vocab_rows(cfg, rows: int) -> bool:
    """Whether a tensor with `rows` rows is indexed by token (not, say, a position embedding)."""
    v = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    return v is None or rows == int(v)  # transformers builds embed / lm_head with config.vocab_size rows


def _hidden(cfg) -> int | None:
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if v is not None:
            return int(v)
    text = getattr(cfg, "text_config", None)
    return _hidden(text) if text is not None else None
