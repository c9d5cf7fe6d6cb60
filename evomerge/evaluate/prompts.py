"""Prompt strings, exactly as lm-eval builds them, so our log-likelihoods equal lm-eval's.

KMMLU (lm-eval `kmmlu` default): ``{question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n정답：`` (U+FF1A)
with continuation ``target_delimiter + letter`` (lm-eval default delimiter " "). Few-shot examples are
``prompt + delimiter + gold`` joined by "\\n\\n" before the query.
"""

from __future__ import annotations

from typing import Sequence

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
    return FEWSHOT_DELIMITER.join(item_prompt(kind, s) + delimiter + item_gold(kind, s) for s in shots) + FEWSHOT_DELIMITER


def pick_shots(item, pool: Sequence, k: int) -> list:
    """The first k dev items of the item's category (KMMLU paper style), topped up from other categories."""
    if k <= 0:
        return []
    same = [s for s in pool if s.category == item.category]
    other = [s for s in pool if s.category != item.category]
    return (same + other)[:k]


def apply_chat(tokenizer, text: str) -> str:
    """Wrap a user turn in the tokenizer's chat template with the generation prompt opened."""
    if getattr(tokenizer, "chat_template", None) is None:
        from evomerge.errors import ConfigError

        raise ConfigError("chat_template: true but the tokenizer has no chat template", key="chat_template",
                          allowed="false for base models")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
