"""Load task items from local files (CSV / JSONL) or Hugging Face data sets, validating every row.

Formats (one record per row / line):
- KMMLU: ``question, A, B, C, D, answer`` (1-4), optional ``Category`` and ``id``. CSV or JSONL.
- MCQ: ``{"id"?, "question", "choices": [...], "answer": 0-based index, "category"?}`` (JSONL).
- Generation: ``{"id"?, "prompt", "answer", "category"?}`` (JSONL).
Rows without an ``id`` get ``"<row index>"`` so a split can be re-scored from its recorded ids.

A KMMLU ``path:`` may also be a local copy of HAERAE-HUB/KMMLU (a folder holding ``data/{Subject}-{split}.csv``,
or those files directly): each subject's file is read as Hugging Face ``datasets`` (hence lm-eval) reads it
(pandas type inference, so a numeric column renders as lm-eval renders it), items get ids
``"{Subject}/{split}/{row}"`` and ``subject`` = the subject, as with ``dataset: HAERAE-HUB/KMMLU``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import DataError
from evomerge.yamlio import read_text

LETTERS = ["A", "B", "C", "D"]


@dataclass(frozen=True)
class MCQItem:
    """A multiple-choice question: the prompt text and the candidate continuations (without delimiter)."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    category: str = "all"
    fields: dict = field(default_factory=dict, compare=False, hash=False)
    subject: str = ""  # the lm-eval task it belongs to (KMMLU subject), when loaded per subject


@dataclass(frozen=True)
class GenItem:
    """A generation item: the prompt and the reference answer string."""

    id: str
    prompt: str
    answer: str
    category: str = "all"
    subject: str = ""


def read_records(path: str | Path) -> list[dict]:
    """Rows of a CSV or JSONL (or JSON list) file as dicts; DataError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found (pass a local CSV or JSONL file as `path:`)", file=str(path), key="path")
    suffix = path.suffix.lower()
    # binary, not UTF-8 or unreadable: one line naming the file (empty: "no items", from load_items)
    text = read_text(path, what="task file", error=DataError, key="path", allow_empty=True)
    if suffix == ".csv":
        try:
            return [dict(r) for r in csv.DictReader(text.splitlines())]
        except csv.Error as exc:
            raise DataError(f"not a valid CSV file: {exc}", file=str(path), key="path") from None
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        lines = text.splitlines()
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                cut = " (truncated file?)" if ln == len(lines) else ""
                raise DataError(f"line {ln} is not valid JSON{cut}: {exc.msg}", file=str(path)) from None
            if not isinstance(rows[-1], dict):
                raise DataError(f"line {ln} is not a JSON object", file=str(path))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg} at line {exc.lineno}", file=str(path)) from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError("a .json task file must hold a list of objects", file=str(path))
        return data
    raise DataError(f"unsupported file type '{suffix}'", file=str(path), key="path", allowed=".csv, .jsonl, .json")


def _require(row: dict, keys: list[str], source: str, index: int) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise DataError(f"row {index} lacks column(s) {missing}", file=source, key=missing[0],
                        allowed=", ".join(keys))


def kmmlu_items(rows: list[dict], source: str, *, id_prefix: str = "", subject: str = "") -> list[MCQItem]:
    """KMMLU rows -> MCQItems with choices A-D; answer column is 1-4 (as in HAERAE-HUB/KMMLU)."""
    items = []
    for i, row in enumerate(rows):
        _require(row, ["question", "A", "B", "C", "D", "answer"], source, i)
        try:
            ans = int(str(row["answer"]).strip())
        except ValueError:
            ans = -1
        if ans not in (1, 2, 3, 4):
            raise DataError(f"row {i}: answer {row['answer']!r} is out of range", file=source, key="answer",
                            allowed="1, 2, 3, 4")
        cat = str(row.get("Category") or row.get("category") or "all")
        rid = str(row.get("id")) if row.get("id") not in (None, "") else f"{id_prefix}{i}"
        fields = {k: str(row[k]) for k in ("question", "A", "B", "C", "D")}
        items.append(MCQItem(rid, str(row["question"]), tuple(LETTERS), ans - 1, cat, fields, subject))
    return items


def mcq_items(rows: list[dict], source: str, *, id_prefix: str = "", subject: str = "") -> list[MCQItem]:
    """Generic MCQ rows (question, choices list, 0-based answer) -> MCQItems."""
    items = []
    for i, row in enumerate(rows):
        _require(row, ["question", "choices", "answer"], source, i)
        choices = row["choices"]
        if isinstance(choices, str):
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                choices = None
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"row {i}: choices must be a list of at least 2 strings", file=source, key="choices")
        try:
            ans = int(row["answer"])
        except (TypeError, ValueError):
            ans = -1
        if not 0 <= ans < len(choices):
            raise DataError(f"row {i}: answer {row['answer']!r} is out of range", file=source, key="answer",
                            allowed=f"0..{len(choices) - 1} (0-based index into choices)")
        rid = str(row.get("id")) if row.get("id") not in (None, "") else f"{id_prefix}{i}"
        items.append(MCQItem(rid, str(row["question"]), tuple(str(c) for c in choices), ans,
                             str(row.get("category") or "all"), subject=subject))
    return items


def gen_items(rows: list[dict], source: str, *, id_prefix: str = "", subject: str = "") -> list[GenItem]:
    """Generation rows (prompt, answer) -> GenItems."""
    items = []
    for i, row in enumerate(rows):
        _require(row, ["prompt", "answer"], source, i)
        rid = str(row.get("id")) if row.get("id") not in (None, "") else f"{id_prefix}{i}"
        items.append(GenItem(rid, str(row["prompt"]), str(row["answer"]), str(row.get("category") or "all"), subject))
    return items


PARSERS: dict[str, Callable[..., list[Any]]] = {"kmmlu": kmmlu_items, "mcq": mcq_items, "generation": gen_items}


def resolve_path(path: str, base_dir: str | Path | None) -> Path:
    """A task path relative to the search-space file's folder (base_dir), or as given."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        cand = Path(base_dir) / p
        if cand.exists() or not p.exists():
            return cand
    return p


def load_hf_rows(dataset: str, subjects: list[str] | None, split: str) -> list[tuple[str, list[dict]]]:
    """(subject, rows) pairs from a Hugging Face data set; DataError naming the data set when it cannot be reached."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets comes with lm-eval
        raise DataError("the `datasets` package is needed for `dataset:`; pass a local file as `path:` instead",
                        key="dataset") from exc
    out = []
    names: list[str | None] = list(subjects) if subjects else [None]
    for subject in names:
        try:
            ds = datasets.load_dataset(dataset, subject, split=split)
        except Exception as exc:  # network, offline mode, unknown config: all mean "not reachable"
            what = f"{dataset}" + (f" (subject '{subject}')" if subject else "") + f", split '{split}'"
            raise DataError(
                f"could not load Hugging Face data set {what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}. "
                "Offline? Download it once, or pass a local CSV/JSONL file as `path:` instead of `dataset:`",
                key="dataset",
            ) from exc
        out.append((subject or "all", [dict(r) for r in ds]))
    return out


def layout_dir(path: Path) -> Path | None:
    """The folder holding ``{Subject}-{split}.csv`` files when `path` is a local KMMLU copy, else None."""
    if not path.is_dir():
        return None
    return path / "data" if (path / "data").is_dir() else path


def read_hf_csv(path: Path) -> list[dict]:
    """Rows of a CSV as Hugging Face's `csv` builder yields them (pandas dtype inference, NaN -> None): what
    lm-eval's templates see, e.g. a column of numbers with one decimal renders every value as ``2.0``."""
    import pandas as pd
    import pyarrow as pa

    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read CSV: {exc}", file=str(path), key="path") from exc
    return pa.Table.from_pandas(frame, preserve_index=False).to_pylist()


def load_layout_rows(root: Path, subjects: list[str] | None, split: str) -> list[tuple[str, list[dict]]]:
    """(subject, rows) pairs from a local copy of HAERAE-HUB/KMMLU (``data/{Subject}-{split}.csv``)."""
    d = layout_dir(root)
    assert d is not None
    suffix = f"-{split}.csv"
    found = sorted(f.name[: -len(suffix)] for f in d.glob(f"*{suffix}"))
    if not found:
        raise DataError(f"no '*{suffix}' files in the folder (expected HAERAE-HUB/KMMLU's layout "
                        f"data/{{Subject}}-{{dev,test}}.csv)", file=str(d), key="path")
    missing = [s for s in subjects or [] if s not in found]
    if missing:
        raise DataError(f"no file for subject '{missing[0]}' ({missing[0]}{suffix})", file=str(d), key="subjects",
                        allowed=", ".join(found[:10]) + (", ..." if len(found) > 10 else ""))
    return [(s, read_hf_csv(d / f"{s}{suffix}")) for s in subjects or found]


def load_items(kind: str, *, path: str | None = None, dataset: str | None = None, subjects: list[str] | None = None,
               split: str = "test", base_dir: str | Path | None = None) -> list[MCQItem] | list[GenItem]:
    """Validated items of one task from a local file, a local KMMLU folder or an HF data set."""
    parse: Callable[..., list[Any]] = PARSERS[kind]
    items: list[Any] = []
    per_subject: list[tuple[str, list[dict]]] | None = None
    if path:
        p = resolve_path(path, base_dir)
        source = str(p)
        if p.is_dir():
            if kind != "kmmlu":
                raise DataError("a folder as `path:` is read as HAERAE-HUB/KMMLU's layout (kind kmmlu only)",
                                file=source, key="path", allowed="a CSV or JSONL file")
            per_subject = load_layout_rows(p, subjects, split)
            source = str(layout_dir(p))
        else:
            items = parse(read_records(p), source)
    else:
        if not dataset:
            raise DataError("no data: give `path:` (a local file or KMMLU folder) or `dataset:`", key="path")
        per_subject = load_hf_rows(dataset, subjects, split)
        source = f"{dataset}:{split}"
    if per_subject is not None:
        for subject, rows in per_subject:
            if kind == "kmmlu":
                for r in rows:  # KMMLU rows carry Category; fall back to the subject name
                    if not r.get("Category"):
                        r["Category"] = subject
                    for k in ("A", "B", "C", "D"):  # an empty cell: lm-eval's template renders None as "None"
                        if k in r and r[k] is None:
                            r[k] = "None"
            where = f"{dataset}:{subject}:{split}" if dataset else source + f"/{subject}-{split}.csv"
            items.extend(parse(rows, where, id_prefix=f"{subject}/{split}/", subject=subject))
    if not items:
        raise DataError("no items in the data (empty file or split)", file=source)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"duplicate item id '{dup}'", file=source, key="id")
    return items
