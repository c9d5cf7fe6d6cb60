"""Batched greedy decoding with a KV cache, stop strings, and MGSM-style answer extraction.

Prompts are tokenized once (`GenPlan`), sorted by length and left-padded into batches; each step runs one
forward of the new token for the whole batch. Rows stop at EOS; stop strings are checked every few steps
(the text is cut at the first stop string afterwards, so checking less often never changes the result).
"""

from __future__ import annotations

import math
import re

import torch

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


class GenPlan:
    """Tokenized prompts in length-sorted, left-padded device batches; `run(model)` -> decoded outputs."""

    def __init__(self, prompt_ids: list[list[int]], tokenizer, *, max_new_tokens: int, stop: list[str],
                 device: str | torch.device = "cpu", batch_tokens: int = 16384, check_every: int = 4):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.check_every = check_every
        self.device = torch.device(device)
        self.n = len(prompt_ids)
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

    @torch.inference_mode()
    def run(self, model) -> list[str]:
        """Greedy outputs (special tokens dropped, cut at EOS and the first stop string), in prompt order."""
        from transformers import DynamicCache

        eos = torch.tensor(eos_ids(model, self.tokenizer) or [-1], device=self.device)
        outputs: list[str] = [""] * self.n
        for idx, ids, mask in self.batches:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
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
                if self.stop and (step + 1) % self.check_every == 0:
                    new = self._stopped(gen[:, :steps], done)
                    lens = torch.where(new & ~done, steps, lens)
                    done = new
                if bool(done.all()) or steps == self.max_new_tokens:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                last = last + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last,
                            past_key_values=out.past_key_values, use_cache=True)
            kept = lens.clamp(max=steps).tolist()
            texts = self.tokenizer.batch_decode([g[:n] for g, n in zip(gen.tolist(), kept)], skip_special_tokens=True)
            for j, t in zip(idx, texts):
                outputs[j] = cut_at_stop(t, self.stop)
        return outputs
