"""Log-likelihood scoring of pre-tokenized (context, continuation) requests, exactly as lm-eval does it.

lm-eval feeds ``(context + continuation)[:-1]`` and sums the log-softmax of each continuation token at the
position before it. We do the same arithmetic, faster:
- everything is tokenized and laid out into padded batches once, at construction (`LoglikPlan`);
- rows are sorted by length and packed to a token budget;
- when every choice of a question is one token (KMMLU letters), the question is ONE row and all choices are
  read at its last position;
- the decoder body runs once per batch, and the LM head + log-softmax run only at scored positions
  (never the full vocabulary at every position); no Python loop per token or per item at scoring time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.errors import DataError


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, L] right-padded
    row_idx: torch.Tensor  # [S] row of each scored position
    pos_idx: torch.Tensor  # [S] position of each scored position
    read_pos: torch.Tensor  # [R] index into the S scored positions
    read_tok: torch.Tensor  # [R] token whose log-prob is read
    read_ans: torch.Tensor  # [R] global answer (request) index the read belongs to


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models: trailing context spaces move to the continuation,
    the continuation tokens are those of the whole string after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


def model_parts(model):
    """(body, head): body(input_ids) -> last hidden states; head(h) -> logits, including any final
    soft-capping / logit scale the model applies. (None, None) when the model does not split that way."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        return None, None
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)
    if scale is not None and not isinstance(scale, (int, float)):
        scale = None

    def head_fn(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return body, head_fn


class LoglikPlan:
    """Pre-tokenized requests laid out into device batches; `run(model)` -> log-likelihood per request.

    `requests` is a list of groups; a group is (context_ids, [continuation_ids, ...]) sharing one context.
    Returned log-likelihoods are in flattened group order (group 0's continuations first).
    """

    def __init__(self, groups: list[tuple[list[int], list[list[int]]]], *, pad_id: int, device: str | torch.device = "cpu",
                 batch_tokens: int = 16384, max_length: int | None = None, source: str = ""):
        self.n_answers = sum(len(c) for _, c in groups)
        self.device = torch.device(device)
        rows = []  # (input_ids, scored positions, reads [(pos_k, tok, ans)])
        ans = 0
        for ctx, conts in groups:
            if any(len(c) == 0 for c in conts):
                raise DataError("a continuation tokenizes to nothing", file=source)
            if not ctx:
                raise DataError("an empty prompt cannot be scored", file=source)
            if all(len(c) == 1 for c in conts):
                inp = list(ctx)
                reads = [(0, c[0], ans + j) for j, c in enumerate(conts)]
                rows.append((inp, [len(ctx) - 1], reads))
            else:
                for j, c in enumerate(conts):
                    full = list(ctx) + list(c)
                    inp = full[:-1]
                    start = len(ctx) - 1
                    rows.append((inp, list(range(start, start + len(c))), [(k, t, ans + j) for k, t in enumerate(c)]))
            ans += len(conts)
        if max_length is not None:  # left-truncate like lm-eval (keeps the scored tail)
            cut_rows = []
            for inp, pos, reads in rows:
                cut = max(0, len(inp) - max_length)
                cut_rows.append((inp[cut:], [p - cut for p in pos], reads))
            rows = cut_rows
        rows.sort(key=lambda r: -len(r[0]))
        self.batches: list[_Batch] = []
        i = 0
        while i < len(rows):
            length = len(rows[i][0])
            n = max(1, batch_tokens // max(length, 1))
            chunk = rows[i:i + n]
            i += n
            self.batches.append(self._make_batch(chunk, length, pad_id))
        self.n_tokens = sum(len(r[0]) for r in rows)

    def _make_batch(self, chunk, length: int, pad_id: int) -> _Batch:
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        row_idx, pos_idx, read_pos, read_tok, read_ans = [], [], [], [], []
        for b, (inp, pos, reads) in enumerate(chunk):
            ids[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            base = len(row_idx)
            row_idx.extend([b] * len(pos))
            pos_idx.extend(pos)
            for k, tok, a in reads:
                read_pos.append(base + k)
                read_tok.append(tok)
                read_ans.append(a)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return _Batch(ids.to(self.device), t(row_idx), t(pos_idx), t(read_pos), t(read_tok), t(read_ans))

    @torch.inference_mode()
    def run(self, model) -> torch.Tensor:
        """Float64 CPU tensor [n_answers]: summed log-probability of each continuation."""
        body, head = model_parts(model)
        out = torch.zeros(self.n_answers, dtype=torch.float64, device=self.device)
        for b in self.batches:
            if body is not None:
                hidden = body(input_ids=b.input_ids, use_cache=False).last_hidden_state
                logits = head(hidden[b.row_idx, b.pos_idx])  # [S, V]: only the scored positions
            else:
                logits = model(input_ids=b.input_ids, use_cache=False).logits[b.row_idx, b.pos_idx]
            logp = torch.log_softmax(logits.float(), dim=-1)
            vals = logp[b.read_pos, b.read_tok].double()
            out.index_add_(0, b.read_ans, vals)
        return out.cpu()
