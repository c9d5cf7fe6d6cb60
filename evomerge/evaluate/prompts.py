"""Prompt strings, exactly as lm-eval builds them, so our log-likelihoods equal lm-eval's.

KMMLU (lm-eval `kmmlu` default): ``{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n정답：`` (U+FF1A)
with continuation ``target_delimiter + letter`` (lm-eval default delimiter " "). Few-shot examples are
``prompt + delimiter + gold`` joined by "\\n\\n" before the query.

Few-shot selection (`lm_eval_shots`, the default) is lm-eval's default `ContextSampler` as `simple_evaluate`
seeds it: each subject (an lm-eval task; the category when there are no subjects) has one
``random.Random(fewshot_seed)``, and every test item of that subject, in file order, takes
``rnd.sample(dev_items_of_the_subject, k)`` (dev in file order; the draws' order is the prompt order).
`pick_shots` is the file-order alternative (``fewshot_order: file``).
"""

from __future__ import annotations

import random
from typing import Sequence

from evomerge.errors import DataError
from evomerge.evaluate.data import GenItem, MCQItem

KMMLU_TEMPLATE = "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n정답："
FEWSHOT_DELIMITER = "\n\n"


def kmmlu_prompt(item: MCQItem) -> str:
    f = item.fields
    return KMMLU_TEMPLATE.format(question=f["question"].strip(), A=f["A"], B=f["B"], C=f["C"], D=f["D"])


def mcq_prompt(item: MCQItem) -> str:
    return item.question


def item_prompt(kind: str, item) -> str:
    if kind == "kmmlu":
        return kmmlu_prompt(item)
    if kind == "mcq":
        return mcq_prompt(item)
    return item.prompt


def item_gold(kind: str, item) -> str:
    if isinstance(item, MCQItem):
        return item.choices[item.answer]
    return item.answer


def fewshot_prefix(kind: str, shots: Sequence[MCQItem | GenItem], delimiter: str) -> str:
    """The k-shot block (ends with the fewshot delimiter) or "" for zero-shot."""
    if not shots:
        return ""
    blocks = [item_prompt(kind, s) + delimiter + item_gold(kind, s) for s in shots]
    return FEWSHOT_DELIMITER.join(blocks) + FEWSHOT_DELIMITER


def pick_shots(item, pool: Sequence, k: int) -> list:
    """``fewshot_order: file``: the first k dev items of the item's category (KMMLU paper style), topped up from
    the other categories, in file order."""
    if k <= 0:
        return []
    same = [s for s in pool if s.category == item.category]
    other = [s for s in pool if s.category != item.category]
    return (same + other)[:k]


def shot_group(item) -> str:
    """The lm-eval task an item belongs to: its subject (KMMLU folder / data set), else its category."""
    return item.subject or item.category


def lm_eval_shots(items: Sequence, pool: Sequence, k: int, *, seed: int = 1234, same_split: bool = False,
                  source: str = "") -> dict[str, list]:
    """Item id -> its k shots, exactly as lm-eval draws them in a run over all of `items` (in their order).

    Per subject, ``rnd = random.Random(seed)`` (lm-eval's ``set_fewshot_seed``, called by ``simple_evaluate`` with
    ``fewshot_random_seed=1234``), then for each of the subject's items in order ``rnd.sample(dev, k)`` with `dev`
    the subject's pool items in file order (`ContextSampler.sample`). When the pool is the test split itself
    (`same_split`), lm-eval samples k + 1 and drops the item being asked. The draws depend only on an item's
    position in the whole test file, never on which subset is scored.
    """
    if k <= 0:
        return {it.id: [] for it in items}
    dev: dict[str, list] = {}
    for s in pool:
        dev.setdefault(shot_group(s), []).append(s)
    rngs: dict[str, random.Random] = {}
    out: dict[str, list] = {}
    for it in items:
        g = shot_group(it)
        cand = dev.get(g, [])
        need = k + 1 if same_split else k
        if len(cand) < need:
            raise DataError(f"num_fewshot={k} but subject/category '{g}' has {len(cand)} few-shot (dev) items; "
                            "lm-eval draws the shots from the item's own subject",
                            file=source, key="num_fewshot",
                            allowed=f"at most {max(len(cand) - (need - k), 0)}, or fewshot_order: file "
                                    "(the first dev items, same category first, topped up from the others)")
        rnd = rngs.setdefault(g, random.Random(seed))
        if same_split:
            shots = [s for s in rnd.sample(cand, k + 1) if s.id != it.id][:k]
            if len(shots) < k:  # lm-eval's fallback (several copies of the item drawn)
                shots = rnd.sample([s for s in cand if s.id != it.id], k)
        else:
            shots = rnd.sample(cand, k)
        out[it.id] = shots
    return out


def apply_chat(tokenizer, text: str) -> str:
    """Wrap a user turn in the tokenizer's chat template with the generation prompt opened."""
    if getattr(tokenizer, "chat_template", None) is None:
        from evomerge.errors import ConfigError

        raise ConfigError("chat_template: true but the tokenizer has no chat template", key="chat_template",
                          allowed="false for base models")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
