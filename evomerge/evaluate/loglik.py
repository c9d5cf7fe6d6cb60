"""Log-likelihood scoring of pre-tokenized (context, continuation) requests, exactly as lm-eval does it.

lm-eval feeds ``(context + continuation)[:-1]`` and sums the log-softmax of each continuation token at the
position before it. We do the same arithmetic, faster:
- everything is tokenized and laid out into padded batches once, at construction (`LoglikPlan`);
- rows are sorted by length and packed to a token budget;
- when every choice of a question is one token (KMMLU letters), the question is ONE row and all choices are
  read at its last position;
- rows that share a long token prefix (the few-shot block of a category, the context of multi-token choices)
  run that prefix once; its KV cache is repeated over a batch of the rows' suffixes;
- the decoder body runs once per batch, and the LM head + log-softmax run only at scored positions
  (never the full vocabulary at every position), as does the last decoder layer's MLP (a dense `*MLP`
  module, via forward hooks; not at all during a shared-prefix pass); no Python loop per token or per item
  at scoring time.
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
    prefix: torch.Tensor | None = None  # [1, P] shared prefix whose KV cache every row continues


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for other in seqs[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return n


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


def last_mlp(model) -> torch.nn.Module | None:
    """The last decoder layer's dense, position-wise MLP (`layers[-1].mlp`, a `*MLP` class: Llama, Qwen, Mistral,
    Gemma, Phi-3, ...), or None (MoE blocks, other layouts): its output is only needed at scored positions."""
    body = getattr(model, "base_model", None)
    layers = getattr(body, "layers", None)
    if body is None or body is model or not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    if getattr(cfg, "num_hidden_layers", len(layers)) != len(layers):
        return None
    mlp = getattr(layers[-1], "mlp", None)
    return mlp if isinstance(mlp, torch.nn.Module) and type(mlp).__name__.endswith("MLP") else None


class _OnlyAt:
    """While active, `mlp` runs on the rows (row_idx, pos_idx) of its [B, L, d] input only and returns zeros
    elsewhere: exact at those positions (the MLP is position-wise), and nothing reads the others (the final norm
    is position-wise and the head runs at scored positions; KV caches hold each layer's attention inputs)."""

    def __init__(self, mlp: torch.nn.Module | None):
        self.mlp = mlp
        self.handles: list = []
        self.where: tuple[torch.Tensor, torch.Tensor] | None = None
        self.shape: torch.Size | None = None
        if mlp is not None:
            self.handles = [mlp.register_forward_pre_hook(self._pre, with_kwargs=True),
                            mlp.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, mod, args, kwargs):
        self.shape = None
        if self.where is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return None
        x = args[0]
        self.shape = x.shape
        return (x[self.where].unsqueeze(0),) + tuple(args[1:]), kwargs

    def _post(self, mod, args, kwargs, out):
        if self.shape is None or not isinstance(out, torch.Tensor):
            return None
        full = out.new_zeros(self.shape)
        full[self.where] = out[0]
        return full

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class LoglikPlan:
    """Pre-tokenized requests laid out into device batches; `run(model)` -> log-likelihood per request.

    `groups` is a list of (context_ids, [continuation_ids, ...]) sharing one context. Returned log-likelihoods are
    in flattened group order (group 0's continuations first). `keys` (one per group, optional) says which groups
    may share a prefix (e.g. the same few-shot block); rows of one group always may. `max_padding` caps the
    fraction of padding tokens in a batch (default 0.03 on CPU, 0.25 elsewhere).
    """

    def __init__(self, groups: list[tuple[list[int], list[list[int]]]], *, pad_id: int,
                 device: str | torch.device = "cpu", batch_tokens: int = 16384, max_length: int | None = None,
                 source: str = "", keys: list | None = None, share_prefix: bool = True, min_prefix: int = 16,
                 max_padding: float | None = None):
        self.n_answers = sum(len(c) for _, c in groups)
        self.device = torch.device(device)
        if max_padding is None:  # CPU: per-token cost is flat, padding is pure waste; GPU: batch size matters more
            max_padding = 0.03 if self.device.type == "cpu" else 0.25
        self.max_padding = max_padding
        self.n_padded = 0  # padding tokens over all batches (reported by the benchmark)
        self.trim_last_mlp = True  # the last layer's MLP only at scored positions (see `_OnlyAt`)
        rows = []  # (input_ids, scored positions, reads [(pos_k, tok, ans)], prefix key)
        ans = 0
        for g, (ctx, conts) in enumerate(groups):
            key = (0, keys[g]) if keys is not None and keys[g] is not None else (1, g)
            if any(len(c) == 0 for c in conts):
                raise DataError("a continuation tokenizes to nothing", file=source)
            if not ctx:
                raise DataError("an empty prompt cannot be scored", file=source)
            if all(len(c) == 1 for c in conts):
                inp = list(ctx)
                reads = [(0, c[0], ans + j) for j, c in enumerate(conts)]
                rows.append((inp, [len(ctx) - 1], reads, key))
            else:
                for j, c in enumerate(conts):
                    full = list(ctx) + list(c)
                    inp = full[:-1]
                    start = len(ctx) - 1
                    rows.append((inp, list(range(start, start + len(c))), [(k, t, ans + j) for k, t in enumerate(c)],
                                 key))
            ans += len(conts)
        if max_length is not None:  # left-truncate like lm-eval (keeps the scored tail)
            cut_rows = []
            for inp, pos, reads, key in rows:
                cut = max(0, len(inp) - max_length)
                cut_rows.append((inp[cut:], [p - cut for p in pos], reads, key))
            rows = cut_rows
        # rows sharing a key and a long common token prefix: prefix once, suffixes batched on its KV cache
        by_key: dict = {}
        for r in rows:
            by_key.setdefault(r[3], []).append(r)
        flat: list = []
        shared: list = []
        for members in by_key.values():
            p = 0
            if share_prefix and len(members) > 1:
                p = min(_common_prefix([m[0] for m in members]), min(min(m[1]) for m in members))
            if p >= min_prefix:
                shared.append((members[0][0][:p], [(m[0][p:], [q - p for q in m[1]], m[2]) for m in members]))
            else:
                flat.extend(m[:3] for m in members)
        self.batches: list[_Batch] = []
        self._pack(flat, None, batch_tokens, pad_id)
        for prefix, members in shared:
            self._pack(members, prefix, batch_tokens, pad_id)
        self.n_tokens = sum(len(r[0]) for r in flat) + sum(len(p) + sum(len(m[0]) for m in ms) for p, ms in shared)

    def _pack(self, rows, prefix, batch_tokens: int, pad_id: int) -> None:
        """Length-sorted batches of at most `batch_tokens` (prefix length counted per row for its attention) and
        at most `max_padding` of their tokens padding: a padded token costs as much as a real one, and on a CPU
        big batches buy almost nothing (per-token cost is flat), so there the cap is tight."""
        rows = sorted(rows, key=lambda r: -len(r[0]))
        extra = len(prefix) if prefix is not None else 0
        if prefix is not None:  # one tensor per prefix: the run loop computes its KV cache once
            prefix = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
        i = 0
        while i < len(rows):
            length = len(rows[i][0])
            n_max = max(1, batch_tokens // max(length + extra // 4, 1))
            j, real = i + 1, length
            while j < len(rows) and j - i < n_max:
                real_j = real + len(rows[j][0])
                if 1.0 - real_j / ((j - i + 1) * length) > self.max_padding:
                    break
                real, j = real_j, j + 1
            self.batches.append(self._make_batch(rows[i:j], length, pad_id, prefix))
            self.n_padded += (j - i) * length - real
            i = j

    def _make_batch(self, chunk, length: int, pad_id: int, prefix=None) -> _Batch:
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        row_idx: list[int] = []
        pos_idx: list[int] = []
        read_pos: list[int] = []
        read_tok: list[int] = []
        read_ans: list[int] = []
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
        return _Batch(ids.to(self.device), t(row_idx), t(pos_idx), t(read_pos), t(read_tok), t(read_ans), prefix)

    @torch.inference_mode()
    def run(self, model) -> torch.Tensor:
        """Float64 CPU tensor [n_answers]: summed log-probability of each continuation."""
        import copy

        body, head = model_parts(model)
        out = torch.zeros(self.n_answers, dtype=torch.float64, device=self.device)
        prefix_cache: dict = {}  # one forward per distinct prefix (batches of one prefix are consecutive)
        only = _OnlyAt(last_mlp(model) if body is not None and self.trim_last_mlp else None)
        nowhere = (torch.zeros(0, dtype=torch.long, device=self.device),) * 2
        try:
            for b in self.batches:
                kw = {"use_cache": False}
                if b.prefix is not None:
                    pid = b.prefix.data_ptr()
                    if pid not in prefix_cache:
                        prefix_cache.clear()
                        only.where = nowhere  # a prefix pass only fills the KV cache: no last MLP at all
                        prefix_cache[pid] = (body or model)(input_ids=b.prefix, use_cache=True).past_key_values
                    cache = copy.deepcopy(prefix_cache[pid])
                    cache.batch_repeat_interleave(b.input_ids.shape[0])
                    kw = {"use_cache": True, "past_key_values": cache}
                if body is not None:
                    only.where = (b.row_idx, b.pos_idx)
                    hidden = body(input_ids=b.input_ids, **kw).last_hidden_state
                    logits = head(hidden[b.row_idx, b.pos_idx])  # [S, V]: only the scored positions
                else:
                    logits = model(input_ids=b.input_ids, **kw).logits[b.row_idx, b.pos_idx]
                logp = torch.log_softmax(logits.float(), dim=-1)
                vals = logp[b.read_pos, b.read_tok].double()
                out.index_add_(0, b.read_ans, vals)
        finally:
            only.remove()
        return out.cpu()
