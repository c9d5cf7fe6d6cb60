"""Merging models whose vocabularies differ (the chat-vector case: a Korean continual-pretrained model
with extra tokens + an English chat model).

Two embedding policies for embed_tokens / lm_head:
- "keep_target": the target model's rows are kept untouched; nothing is merged there.
- "align": rows are matched by token string across tokenizers; each source row is placed at the target
  row of the same token, and rows whose token the source lacks keep `fill_rows` (the target's own rows,
  or the base's), so their delta is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.errors import ConfigError

EMBEDDING_POLICIES = ("keep_target", "align")


def check_policy(policy: str, *, file: str | None = None, key: str = "embedding_policy") -> str:
    """The policy itself when known; ConfigError naming the allowed ones otherwise."""
    if policy not in EMBEDDING_POLICIES:
        raise ConfigError(f"unknown embedding policy '{policy}'", file=file, key=key,
                          allowed=", ".join(EMBEDDING_POLICIES))
    return policy


def vocab_index_map(target_tok, source_tok, *, num_rows: int | None = None,
                    source_rows: int | None = None) -> torch.Tensor:
    """index_map[target_row] = source row of the same token string, or -1 where the source lacks it.

    `num_rows`: the target embedding's row count (often padded beyond the tokenizer); rows without a
    token map to -1. `source_rows`: ids at or beyond it are treated as missing.
    """
    t_vocab = target_tok.get_vocab()
    s_vocab = source_tok.get_vocab()
    n = num_rows if num_rows is not None else (max(t_vocab.values()) + 1 if t_vocab else 0)
    index_map = torch.full((n,), -1, dtype=torch.long)
    for token, t_id in t_vocab.items():
        s_id = s_vocab.get(token)
        if s_id is None or t_id >= n or (source_rows is not None and s_id >= source_rows):
            continue
        index_map[t_id] = s_id
    return index_map


def align_rows(source_rows: torch.Tensor, index_map: torch.Tensor, fill_rows: torch.Tensor) -> torch.Tensor:
    """Rows in the target's order: row r = source_rows[index_map[r]], or fill_rows[r] where the map says -1.

    Never fails on a size difference: map entries beyond `fill_rows` are ignored, fill rows beyond the map
    and map entries pointing past `source_rows` keep the fill.
    """
    if source_rows.shape[1:] != fill_rows.shape[1:]:
        raise ValueError(f"rows of width {tuple(source_rows.shape[1:])} cannot fill rows of width "
                         f"{tuple(fill_rows.shape[1:])}")
    out = fill_rows.clone()
    m = index_map[: out.shape[0]].to(out.device)
    valid = (m >= 0) & (m < source_rows.shape[0])
    rows = torch.nonzero(valid, as_tuple=True)[0]
    out[rows] = source_rows.to(out.device)[m[rows]].to(out.dtype)
    return out


@dataclass(frozen=True)
class VocabAlignment:
    """How one source's rows map onto the target's rows."""

    source: str
    index_map: torch.Tensor  # int64
    target_tokens: int  # rows of the target that carry a token

    @property
    def matched(self) -> int:
        return int((self.index_map >= 0).sum())

    @property
    def kept(self) -> int:
        """Target rows that keep their fill (the source has no such token, or the row is padding)."""
        return int(self.index_map.numel() - self.matched)

    def report(self) -> str:
        return (f"'{self.source}': {self.matched} of {self.target_tokens} target tokens matched by string, "
                f"{self.kept} row(s) kept from the target")


def align_vocab(target_tok, source_toks: dict, *, num_rows: int | None = None,
                source_rows: dict[str, int] | None = None) -> dict[str, VocabAlignment]:
    """One `VocabAlignment` per source tokenizer (name -> tokenizer)."""
    n_tokens = len(target_tok.get_vocab())
    out = {}
    for name, tok in source_toks.items():
        m = vocab_index_map(target_tok, tok, num_rows=num_rows,
                            source_rows=(source_rows or {}).get(name))
        out[name] = VocabAlignment(name, m, n_tokens)
    return out


def embedding_report(policy: str, target: str, alignments: dict[str, VocabAlignment] | None = None,
                     vocab_sizes: dict[str, int] | None = None) -> str:
    """A short human-readable account of what was done with embed_tokens / lm_head."""
    check_policy(policy)
    if policy == "keep_target":
        sizes = ", ".join(f"'{k}' {v}" for k, v in (vocab_sizes or {}).items())
        return (f"embedding policy keep_target: embed_tokens / lm_head copied from '{target}', not merged"
                + (f" (vocab rows: {sizes})" if sizes else ""))
    lines = [f"embedding policy align: rows matched by token string onto '{target}'"]
    lines += ["  " + a.report() for a in (alignments or {}).values()]
    return "\n".join(lines)


def token_row_ids(pairs: list[tuple[int | str, int | str]], target_tok, source_tok, *, target_rows: int,
                  source_rows: int, target: str, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(target row ids, source row ids) of the (target token, source token) pairs: strings are looked up in
    each tokenizer's vocabulary, integers are row ids. ConfigError naming the token that is not there."""
    key = "evomerge.token_rows.tokens"

    def row(ref: int | str, tok, rows: int, model: str) -> int:
        if isinstance(ref, int):
            i = ref
        else:
            vocab = tok.get_vocab() if tok is not None else {}
            if ref not in vocab:
                raise ConfigError(f"token {ref!r} is not in the vocabulary of model '{model}'"
                                  + ("" if tok is not None else " (it has no tokenizer: give row ids)"), key=key)
            i = vocab[ref]
        if not 0 <= i < rows:
            raise ConfigError(f"row {i} (token {ref!r}) is outside model '{model}''s {rows} embedding rows", key=key)
        return i

    t_ids = [row(t, target_tok, target_rows, target) for t, _ in pairs]
    s_ids = [row(s, source_tok, source_rows, source) for _, s in pairs]
    dup = next((t for t in t_ids if t_ids.count(t) > 1), None)
    if dup is not None:
        raise ConfigError(f"target row {dup} is named twice", key=key)
    return torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long)
