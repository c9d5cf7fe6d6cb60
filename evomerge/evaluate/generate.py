"""Batched greedy decoding with a KV cache, stop strings, and MGSM-style answer extraction.

Prompts are tokenized once (`GenPlan`), sorted by length and left-padded into batches; each step runs one
forward of the new token for the whole batch. Rows stop at EOS; stop strings are checked every few steps
(the text is cut at the first stop string afterwards, so checking less often never changes the result).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch

from evomerge.evaluate.decode import FALLBACK_ERRORS, CompileMode, StaticDecoder, cache_kwarg

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$7' -> '7', '-3.0' -> '-3'; None when `text` is not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return None
    if not math.isfinite(v):
        return None
    if v == int(v):
        return str(int(v))
    return repr(v)


def normalize_answer(text: str) -> str:
    """Strip; numbers in canonical form (as MGSM compares them)."""
    num = normalize_number(text)
    return num if num is not None else text.strip()


def extract_answer(output: str, *, regex: str | None = None, numeric: bool = False) -> str:
    """The answer inside a model output: the regex's first match (group 1 if it has groups), else the
    last number when the gold answer is numeric (MGSM), else the whole stripped output."""
    if regex:
        m = re.search(regex, output)
        if not m:
            return ""
        return m.group(1) if m.groups() else m.group(0)
    if numeric:
        nums = _NUMBER.findall(output)
        return nums[-1] if nums else ""
    return output.strip()


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text up to the first occurrence of any stop string (lm-eval `until` semantics)."""
    for s in stop:
        if s:
            text = text.split(s, 1)[0]
    return text


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    return sorted(ids)


DecodeMode = Literal["auto", "static", "dynamic"]


class GenPlan:
    """Tokenized prompts in length-sorted, left-padded device batches; `run(model)` -> decoded outputs.

    `decode`: "auto" (default) decodes with the static KV cache (`evomerge.evaluate.decode.StaticDecoder`) when
    the model supports it and with the dynamic-cache loop otherwise; "static" / "dynamic" force one (for tests and
    benchmarks; "static" on a model that cannot take it is an error). `compile`: the static path's compiled decode
    step ("auto": on CUDA, from a model object's second call on). Both paths give the same tokens.
    """

    def __init__(self, prompt_ids: list[list[int]], tokenizer, *, max_new_tokens: int, stop: list[str],
                 device: str | torch.device = "cpu", batch_tokens: int = 16384, check_every: int = 4,
                 decode: DecodeMode = "auto", compile: CompileMode = "auto"):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.check_every = check_every
        self.device = torch.device(device)
        self.n = len(prompt_ids)
        self.decode = decode
        self.decoder = StaticDecoder(compile=compile, check_every=check_every)
        self.last_path = ""  # "static", "static+graph" or "dynamic": how the last `run` decoded (tests, benchmarks)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.pad_id = int(pad)
        order = sorted(range(self.n), key=lambda i: -len(prompt_ids[i]))
        self.batches = []
        i = 0
        while i < len(order):
            length = len(prompt_ids[order[i]])
            n = max(1, batch_tokens // (length + max_new_tokens))
            idx = order[i:i + n]
            i += n
            ids = torch.full((len(idx), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), length), dtype=torch.long)
            for r, j in enumerate(idx):
                p = prompt_ids[j]
                ids[r, length - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[r, length - len(p):] = 1
            self.batches.append((idx, ids.to(self.device), mask.to(self.device)))

    @property
    def n_prompt_tokens(self) -> int:
        return int(sum(int(mask.sum()) for _, _, mask in self.batches))

    def _stopped(self, gen: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Rows whose text so far contains a stop string."""
        out = done.clone()
        rows = (~done).nonzero().flatten().tolist()
        if not rows:
            return out
        texts = self.tokenizer.batch_decode(gen[rows].tolist(), skip_special_tokens=True)  # done rows are skipped
        for r, t in zip(rows, texts):
            if any(s and s in t for s in self.stop):
                out[r] = True
        return out

    def _path(self, model) -> str:
        """"static" or "dynamic" for this model, as `decode` asks."""
        if self.decode == "dynamic":
            return "dynamic"
        why = self.decoder.unsupported(model)
        if why is None:
            return "static"
        if self.decode == "static":
            raise ValueError(f"static-cache decoding is not possible here: {why}")
        return "dynamic"

    def run(self, model) -> list[str]:
        """Greedy outputs (special tokens dropped, cut at EOS and the first stop string), in prompt order."""
        texts = self.tokenizer.batch_decode(self.tokens(model), skip_special_tokens=True)
        return [cut_at_stop(t, self.stop) for t in texts]

    def tokens(self, model) -> list[list[int]]:
        """Greedy token ids per prompt, in prompt order: up to (not including) EOS, or up to the check that found
        a stop string in the text, or max_new_tokens. `run` decodes and cuts these."""
        eos = torch.tensor(eos_ids(model, self.tokenizer) or [-1], device=self.device)
        path = self._path(model)
        if path == "static":
            self.decoder.begin(model)
        stopped = self._stopped if self.stop else None
        out: list[list[int]] = [[] for _ in range(self.n)]
        used = set()
        for b, (idx, ids, mask) in enumerate(self.batches):
            result = None
            if path == "static":
                try:
                    result = self.decoder.decode(model, b, ids, mask, max_new_tokens=self.max_new_tokens, eos=eos,
                                                 pad_id=self.pad_id, stopped=stopped)
                    used.add("static+graph" if self.decoder.graph_used else "static")
                except torch.OutOfMemoryError:
                    raise
                except FALLBACK_ERRORS as exc:  # an architecture the static cache cannot handle after all
                    if self.decode == "static":
                        raise
                    self.decoder.note_failure(model, exc)
                    path = "dynamic"
            if result is None:
                result = self._decode_dynamic(model, ids, mask, eos, stopped)
                used.add("dynamic")
            gen, kept = result
            for j, g, n in zip(idx, gen.tolist(), kept):
                out[j] = g[:n]
        self.last_path = "+".join(sorted(used))
        return out

    @torch.inference_mode()
    def _decode_dynamic(self, model, ids: torch.Tensor, mask: torch.Tensor, eos: torch.Tensor,
                        stopped) -> tuple[torch.Tensor, list[int]]:
        """The dynamic-cache loop (any model whose forward takes a transformers cache): one batch ->
        ([rows, max_new_tokens] token ids, pad after the end; generated tokens kept per row)."""
        from transformers import DynamicCache

        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        ckw = cache_kwarg(model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{ckw: cache})
        gen = torch.full((ids.shape[0], self.max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        lens = torch.full_like(done, self.max_new_tokens, dtype=torch.long)  # generated tokens kept per row
        last = pos[:, -1:]
        steps = 0
        for step in range(self.max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            is_eos = torch.isin(nxt, eos)
            lens = torch.where(is_eos & ~done, step, lens)  # the EOS token itself is not part of the text
            gen[:, step] = torch.where(done | is_eos, self.pad_id, nxt)
            done = done | is_eos
            steps = step + 1
            if stopped is not None and (step + 1) % self.check_every == 0:
                new = stopped(gen[:, :steps], done)
                lens = torch.where(new & ~done, steps, lens)
                done = new
            if bool(done.all()) or steps == self.max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                        **{ckw: cache})
        return gen, lens.clamp(max=steps).tolist()
