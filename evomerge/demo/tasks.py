"""Synthetic character-level tasks for the offline zoos: the demo's addition, sorting and counting letters, and
the other zoos' families (digit sums, dropping repeated letters, comparing numbers, ordering words).

Every task has a fixed-length prompt (so a batch of one task needs no padding) and a short answer that the
model must produce followed by EOS. Items are split into disjoint train / search / held-out sets by prompt:
the held-out prompts never appear in training nor in the search split, so a merge chosen on the search split
is judged on data nobody has seen.

Files use the generation-task JSONL format the evaluation subsystem reads, one object a line:
`{"id": str, "prompt": str, "answer": str, "category": task_name}` (an extra "split" key is informative only).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from evomerge.errors import ConfigError, DataError

SPLITS = ("train", "search", "heldout")

# Letters used by the sort and count tasks. Count draws 10 letters from 8 so repeats are common; with 9 from 6 the
# base learned counting almost perfectly (0.94) and the count expert had nothing left to add to a merge.
SORT_LETTERS = "abcdefghijklmnopqrstuvwxyz"
SORT_LENGTH = 8
COUNT_LETTERS = "abcdefgh"
COUNT_LENGTH = 10


@dataclass(frozen=True)
class Item:
    """One prompt/answer pair of a generation task."""

    id: str
    prompt: str
    answer: str
    category: str


# The other zoos' families (evomerge.demo.zoos), chosen so that a base trained on their mix learns each only in
# part (held-out exact match 0.6-0.7), like the demo's. Every string stays inside the demo's alphabet, so all zoos
# share one character tokenizer. Tasks a 4-layer model learns position by position (reversing, a substitution
# cipher, shifting letters, prefix sums, running maxima) reached 0.95-1.0 in such a base and were left out.
# - dsum: the sum of 6 digits ("dsum:384920=" -> "26")
# - dedup: 10 letters from a..j with repeats dropped, first occurrences in order ("uniq:abacbd=" -> "abcd")
# - cmp: the larger of two 4-digit numbers ("cmp:4821:4819=" -> "4821")
# - hi / lo: the later / earlier in alphabetical order of two 6-letter words over a..d ("hi:abcadd:abccaa=" ->
#   "abccaa"): the same inputs and prompt format with opposite answers, so experts fine-tuned on them pull apart.
DSUM_LENGTH = 6
DEDUP_LETTERS, DEDUP_LENGTH = "abcdefghij", 10
CMP_DIGITS = 4
ORDER_LETTERS, ORDER_LENGTH = "abcd", 6
_ORDER_SPEC = {"order_letters": ORDER_LETTERS, "order_length": ORDER_LENGTH}
_EXTRA_SPECS: dict[str, dict[str, object]] = {
    "dsum": {"dsum_length": DSUM_LENGTH},
    "dedup": {"dedup_letters": DEDUP_LETTERS, "dedup_length": DEDUP_LENGTH},
    "cmp": {"cmp_digits": CMP_DIGITS},
    "hi": _ORDER_SPEC,
    "lo": _ORDER_SPEC,
}


def task_spec(tasks: Iterable[str] = ()) -> dict[str, object]:
    """The knobs that define the tasks' items (a zoo cache is only valid for the same spec): the demo's, plus
    those of any other family among `tasks` (so the demo zoo's spec, hence its cache key, never changes)."""
    spec: dict[str, object] = {"sort_letters": SORT_LETTERS, "sort_length": SORT_LENGTH,
                               "count_letters": COUNT_LETTERS, "count_length": COUNT_LENGTH}
    for task in tasks:
        spec.update(_EXTRA_SPECS.get(task, {}))
    return spec


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"add:{a}+{b}=", str(a + b)


def _sort(rng: random.Random) -> tuple[str, str]:
    letters = "".join(rng.choice(SORT_LETTERS) for _ in range(SORT_LENGTH))
    return f"sort:{letters}=", "".join(sorted(letters))


def _count(rng: random.Random) -> tuple[str, str]:
    letters = "".join(rng.choice(COUNT_LETTERS) for _ in range(COUNT_LENGTH))
    counts = Counter(letters)
    return f"cnt:{letters}=", "".join(f"{counts[c]}{c}" for c in sorted(counts))


def _letters(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _dsum(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng, "0123456789", DSUM_LENGTH)
    return f"dsum:{s}=", str(sum(map(int, s)))


def _dedup(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng, DEDUP_LETTERS, DEDUP_LENGTH)
    return f"uniq:{s}=", "".join(dict.fromkeys(s))


def _cmp(rng: random.Random) -> tuple[str, str]:
    lo, hi = 10 ** (CMP_DIGITS - 1), 10**CMP_DIGITS - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"cmp:{a}:{b}=", str(max(a, b))


def _pair(rng: random.Random) -> tuple[str, str]:
    return _letters(rng, ORDER_LETTERS, ORDER_LENGTH), _letters(rng, ORDER_LETTERS, ORDER_LENGTH)


def _hi(rng: random.Random) -> tuple[str, str]:
    a, b = _pair(rng)
    return f"hi:{a}:{b}=", max(a, b)


def _lo(rng: random.Random) -> tuple[str, str]:
    a, b = _pair(rng)
    return f"lo:{a}:{b}=", min(a, b)


Generator = Callable[[random.Random], tuple[str, str]]
GENERATORS: dict[str, Generator] = {"add": _add, "sort": _sort, "count": _count}
TASKS = tuple(GENERATORS)  # the demo zoo's tasks
FAMILIES: dict[str, Generator] = {**GENERATORS, "dsum": _dsum, "dedup": _dedup, "cmp": _cmp, "hi": _hi,
                                  "lo": _lo}  # every task any zoo uses


def check_tasks(tasks: Iterable[str], *, key: str = "tasks") -> tuple[str, ...]:
    """Validate task names; raises ConfigError naming the allowed ones."""
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in FAMILIES]
    if bad or not tasks:
        raise ConfigError(f"unknown task(s) {bad or '(none)'}", key=key, allowed=", ".join(FAMILIES))
    return tasks


def make_item(task: str, rng: random.Random) -> tuple[str, str]:
    """One random (prompt, answer) of `task`."""
    return FAMILIES[check_tasks([task], key="task")[0]](rng)


def solve(prompt: str) -> str:
    """The correct answer of any task prompt (the ground truth recomputed from the prompt alone)."""
    head, _, body = prompt.partition(":")
    body = body.rstrip("=")
    if head == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if head == "sort":
        return "".join(sorted(body))
    if head == "cnt":
        counts = Counter(body)
        return "".join(f"{counts[c]}{c}" for c in sorted(counts))
    if head == "dsum":
        return str(sum(map(int, body)))
    if head == "uniq":
        return "".join(dict.fromkeys(body))
    if head == "cmp":
        return str(max(map(int, body.split(":"))))
    if head in ("hi", "lo"):
        return (max if head == "hi" else min)(body.split(":"))
    raise DataError(f"not a task prompt: {prompt!r}", allowed="add:, sort:, cnt:, dsum:, uniq:, cmp:, hi:, lo:")


def generate_splits(tasks: Iterable[str] = TASKS, *, seed: int = 0, train: int = 20000, search: int = 128,
                    heldout: int = 384) -> dict[str, dict[str, list[Item]]]:
    """Seeded, disjoint item sets: split -> task -> items.

    Held-out items are drawn first, then search, then train; a prompt seen in an earlier split is rejected,
    so no prompt occurs twice anywhere. Each task has its own random stream, so adding a task leaves the
    others' items unchanged.
    """
    sizes = {"heldout": heldout, "search": search, "train": train}
    out: dict[str, dict[str, list[Item]]] = {s: {} for s in SPLITS}
    for task in check_tasks(tasks):
        rng = random.Random(f"evomerge-demo:{seed}:{task}")
        seen: set[str] = set()
        for split in ("heldout", "search", "train"):
            items: list[Item] = []
            tries = 0
            while len(items) < sizes[split]:
                tries += 1
                if tries > 50 * sizes[split] + 1000:
                    raise DataError(f"cannot draw {sizes[split]} distinct {task!r} items for split {split!r}")
                prompt, answer = FAMILIES[task](rng)
                if prompt in seen:
                    continue
                seen.add(prompt)
                items.append(Item(f"{task}-{split}-{len(items):05d}", prompt, answer, task))
            out[split][task] = items
    return out


def write_jsonl(items: Iterable[Item], path: str | Path, *, split: str | None = None) -> Path:
    """Write items as generation-task JSONL (one object a line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for item in items:
            row = asdict(item)
            if split is not None:
                row["split"] = split
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: str | Path) -> list[Item]:
    """Read a generation-task JSONL file; DataError names the file and line of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise DataError("task file not found", file=str(path))
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append(Item(str(row["id"]), str(row["prompt"]), str(row["answer"]), str(row["category"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"line {n}: {e}", file=str(path),
                                allowed="JSON objects with id, prompt, answer, category") from None
    return items


def write_task_files(splits: dict[str, dict[str, list[Item]]], root: str | Path) -> dict[str, dict[str, Path]]:
    """Write root/{split}/{task}.jsonl for every split, and root/{task}.jsonl = search + held-out items.

    The combined file carries a "split" key on each row so an evaluator that reads one file per task can still
    tell the search items from the held-out ones. Returns split -> task -> path (split "all" = combined file).
    """
    root = Path(root)
    paths: dict[str, dict[str, Path]] = {s: {} for s in (*SPLITS, "all")}
    for split, by_task in splits.items():
        for task, items in by_task.items():
            paths[split][task] = write_jsonl(items, root / split / f"{task}.jsonl", split=split)
    for task in splits["search"]:
        rows = [(i, "search") for i in splits["search"][task]] + [(i, "heldout") for i in splits["heldout"][task]]
        path = root / f"{task}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for item, split in rows:
                f.write(json.dumps({**asdict(item), "split": split}, ensure_ascii=False) + "\n")
        tmp.replace(path)
        paths["all"][task] = path
    return paths
