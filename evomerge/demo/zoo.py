"""The offline demo's model zoo: a tiny trained Llama base and one fine-tuned expert per task.

Why it looks like this: the base is trained on an equal mix of the tasks and left mediocre on purpose; each
expert is a short, gentle fine-tune of the base on one task, so it gains on its task, forgets the others, and
stays near the base. That is the regime where merging experts wins over every single model, which gives the
merge search something to find. Everything is saved as ordinary Hugging Face folders, so the rest of evomerge
treats the zoo like any downloaded models.

Building takes a few minutes on one CPU core; the result is cached under `root` behind a manifest that records
the settings, and reused when the same settings ask again.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evomerge.demo.tasks import (
    TASKS,
    Item,
    check_tasks,
    generate_splits,
    read_jsonl,
    task_spec,
    write_task_files,
)
from evomerge.errors import ConfigError

ZOO_VERSION = 2  # bump when training changes, so stale caches rebuild
MANIFEST = "manifest.json"
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789+=:"  # covers every task string; ids: 4 specials + these


@dataclass
class Zoo:
    """A built (or reused) zoo: HF folders of the base and experts, task files, and the settings behind them."""

    root: Path
    base: Path
    experts: dict[str, Path]
    tasks: dict[str, dict[str, Path]]  # split ("train", "search", "heldout", "all") -> task -> jsonl
    settings: dict
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> task -> held-out exact match
    reused: bool = False
    build_seconds: float = 0.0

    def models(self) -> dict[str, Path]:
        """name -> HF folder, base first."""
        return {"base": self.base, **{f"expert_{t}": p for t, p in self.experts.items()}}

    def items(self, split: str, task: str) -> list[Item]:
        return read_jsonl(self.tasks[split][task])


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization and batches


def encode_items(tokenizer, items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 except on answer + EOS), for teacher-forced training or scoring."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs, labels = [], []
    for it in items:
        p = tokenizer(it.prompt, add_special_tokens=False).input_ids
        a = tokenizer(it.answer, add_special_tokens=False).input_ids + [eos]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the labelled (answer + EOS) positions ("mean" or "sum").

    Right padding sits after EOS, so causal attention never lets it influence a labelled position and no
    attention mask is needed; positions start at 0 for every row, as at generation time.
    """
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction=reduction)


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16,
                   batch_size: int = 256) -> list[str]:
    """Greedy continuations up to EOS, batched by prompt length (task prompts have fixed lengths: no padding)."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    enc = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        by_len.setdefault(len(e), []).append(i)
    for idx_all in by_len.values():
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            ids = torch.tensor([enc[i] for i in idx])
            res = model(input_ids=ids, use_cache=True)
            past, gen = res.past_key_values, []
            done = torch.zeros(len(idx), dtype=torch.bool)
            for _ in range(max_new_tokens):
                nxt = res.logits[:, -1].argmax(-1)
                gen.append(nxt)
                done |= nxt == eos
                if bool(done.all()):
                    break
                res = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
                past = res.past_key_values
            toks = torch.stack(gen, 1).tolist()
            for row, i in zip(toks, idx):
                if eos in row:
                    row = row[: row.index(eos)]
                    out[i] = tokenizer.decode(row)
                else:
                    out[i] = "\0" + tokenizer.decode(row)  # no EOS: never an exact match
    model.train(was_training)
    return out


def exact_match(model, tokenizer, items: Sequence[Item], *, batch_size: int = 256) -> float:
    """Fraction of items whose greedy answer (up to EOS) equals the reference exactly."""
    if not items:
        return 0.0
    max_new = max(len(it.answer) for it in items) + 2
    answers = greedy_answers(model, tokenizer, [it.prompt for it in items], max_new_tokens=max_new,
                             batch_size=batch_size)
    return sum(a == it.answer for a, it in zip(answers, items)) / len(items)


def score_tasks(model, tokenizer, items_by_task: Mapping[str, Sequence[Item]]) -> dict[str, float]:
    """Exact match per task, plus "mean" over the given tasks."""
    scores = {t: exact_match(model, tokenizer, its) for t, its in items_by_task.items()}
    scores["mean"] = sum(scores.values()) / max(len(scores), 1)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Training


def new_model(tokenizer, *, seed: int, layers: int = 4, hidden: int = 128, heads: int = 4, intermediate: int = 256):
    """A freshly initialised tiny LlamaForCausalLM sized for the zoo (no tied embeddings)."""
    from evomerge.models.tiny import random_model, tiny_config

    cfg = tiny_config("llama", vocab_size=len(tokenizer), num_layers=layers, hidden=hidden, heads=heads,
                      kv_heads=heads, intermediate=intermediate, tie_embeddings=False)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                            tokenizer.eos_token_id)
    return random_model(cfg, seed=seed)


def train(model, tokenizer, items_by_task: Mapping[str, Sequence[Item]], *, steps: int, lr: float, batch_size: int,
          seed: int, label: str, log_every: int = 50, on_log: Callable[[int, float], None] | None = None):
    """AdamW on an equal mix of the given tasks (batch split evenly across tasks, epochs reshuffled per task)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tasks = list(items_by_task)
    encoded = {t: encode_items(tokenizer, its) for t, its in items_by_task.items()}
    lengths = {t: (ids != tokenizer.pad_token_id).sum(1) for t, (ids, _) in encoded.items()}
    per_task = [batch_size // len(tasks) + (1 if i < batch_size % len(tasks) else 0) for i in range(len(tasks))]
    orders = {t: torch.randperm(len(items_by_task[t]), generator=gen) for t in tasks}
    cursor = {t: 0 for t in tasks}
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    t0, running = time.perf_counter(), None
    for step in range(1, steps + 1):
        parts = []
        for t, n in zip(tasks, per_task):
            if cursor[t] + n > len(orders[t]):
                orders[t], cursor[t] = torch.randperm(len(items_by_task[t]), generator=gen), 0
            sel = orders[t][cursor[t] : cursor[t] + n]
            cursor[t] += n
            width = int(lengths[t][sel].max())  # trim the padding this batch does not need
            parts.append((encoded[t][0][sel, :width], encoded[t][1][sel, :width]))
        # One forward per task (each at its own width, about 25% less work than padding the mix to one width),
        # gradients accumulated so the loss is still the mean over every labelled token of the whole batch.
        n_labels = sum(int((lab[:, 1:] != -100).sum()) for _, lab in parts)
        opt.zero_grad(set_to_none=True)
        loss = torch.zeros(())
        for ids, lab in parts:
            part = answer_loss(model, ids, lab, reduction="sum") / n_labels
            part.backward()
            loss += part.detach()
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.9 * running + 0.1 * value
        if step % log_every == 0 or step == steps:
            _log(f"{label} step {step}/{steps} loss {running:.4f} ({time.perf_counter() - t0:.1f}s)")
            if on_log is not None:
                on_log(step, running)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Build / cache


def _settings(**kw) -> dict:
    kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}
    return {"version": ZOO_VERSION, **kw}


def load_zoo(root: str | Path) -> Zoo | None:
    """The zoo recorded by root/manifest.json, or None when it is absent, unreadable or incomplete."""
    root = Path(root)
    try:
        man = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:
        base = root / man["base"]
        experts = {t: root / p for t, p in man["experts"].items()}
        tasks = {s: {t: root / p for t, p in by.items()} for s, by in man["tasks"].items()}
        settings, scores = dict(man["settings"]), dict(man.get("scores", {}))
        build_seconds = float(man.get("build_seconds", 0.0))
    except (KeyError, AttributeError, TypeError, ValueError):
        return None
    for folder in [base, *experts.values()]:
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")) \
                or not (folder / "tokenizer.json").is_file():
            return None
    if not all(p.is_file() for by in tasks.values() for p in by.values()):
        return None
    return Zoo(root=root, base=base, experts=experts, tasks=tasks, settings=settings, scores=scores, reused=True,
               build_seconds=build_seconds)


def build_zoo(root: str | Path, *, seed: int = 0, base_steps: int = 500, expert_steps: int = 300,
              experts: Iterable[str] = ("sort", "count"), tasks: Iterable[str] = TASKS, base_lr: float = 1e-3,
              expert_lr: float = 5e-4, batch_size: int = 96, train_size: int = 20000, search_size: int = 128,
              heldout_size: int = 384, layers: int = 4, hidden: int = 128, heads: int = 4, intermediate: int = 256,
              score: bool = True, force: bool = False, threads: int | None = 1, log_every: int = 50) -> Zoo:
    """Build the zoo under `root` (root/base, root/expert_<task>, root/tasks, root/manifest.json), or reuse it.

    Deterministic for a seed on one torch thread. `score` measures held-out exact match of every model and
    records it in the manifest. `threads` sets torch's thread count for the build (None leaves it alone; one
    thread is fastest on a busy 2-core machine) and is restored afterwards.
    """
    root = Path(root)
    tasks = check_tasks(tasks)
    experts = check_tasks(experts, key="experts")
    missing = [e for e in experts if e not in tasks]
    if missing:
        raise ConfigError(f"experts {missing} are not among the base's tasks", key="experts", allowed=", ".join(tasks))
    positive = {"base_steps": base_steps, "expert_steps": expert_steps, "batch_size": batch_size,
                "train_size": train_size, "search_size": search_size, "heldout_size": heldout_size}
    for name, v in positive.items():
        if int(v) < 1:
            raise ConfigError(f"must be a positive integer, got {v}", key=name)
    if batch_size < len(tasks):
        raise ConfigError(f"{batch_size} is smaller than the number of tasks ({len(tasks)})", key="batch_size")
    settings = _settings(seed=seed, base_steps=base_steps, expert_steps=expert_steps, experts=experts, tasks=tasks,
                         base_lr=base_lr, expert_lr=expert_lr, batch_size=batch_size, train_size=train_size,
                         search_size=search_size, heldout_size=heldout_size, layers=layers, hidden=hidden,
                         heads=heads, intermediate=intermediate, alphabet=ALPHABET, task_spec=task_spec(tasks),
                         score=score)
    if not force:
        cached = load_zoo(root)
        if cached is not None and cached.settings == settings:
            _log(f"reusing {root}")
            return cached

    from evomerge.models.tiny import char_tokenizer, save_model

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t_start = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        (root / MANIFEST).unlink(missing_ok=True)  # the zoo is incomplete until the manifest is rewritten
        tok = char_tokenizer(ALPHABET)
        splits = generate_splits(tasks, seed=seed, train=train_size, search=search_size, heldout=heldout_size)
        task_paths = write_task_files(splits, root / "tasks")
        heldout = {t: splits["heldout"][t] for t in experts}

        model = new_model(tok, seed=seed, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"base: {n_params} parameters, {base_steps} steps on {', '.join(tasks)}")
        train(model, tok, splits["train"], steps=base_steps, lr=base_lr, batch_size=batch_size, seed=seed,
              label="base", log_every=log_every)
        folders = {"base": save_model(model, tok, _fresh(root / "base"))}
        scores: dict[str, dict[str, float]] = {}
        if score:
            scores["base"] = score_tasks(model, tok, heldout)
            _log(f"base held-out exact match {_fmt(scores['base'])}")
        expert_paths = {}
        for i, task in enumerate(experts):
            exp = copy.deepcopy(model)
            train(exp, tok, {task: splits["train"][task]}, steps=expert_steps, lr=expert_lr, batch_size=batch_size,
                  seed=seed * 1000 + i + 1, label=f"expert_{task}", log_every=log_every)
            expert_paths[task] = save_model(exp, tok, _fresh(root / f"expert_{task}"))
            if score:
                scores[f"expert_{task}"] = score_tasks(exp, tok, heldout)
                _log(f"expert_{task} held-out exact match {_fmt(scores[f'expert_{task}'])}")
        elapsed = time.perf_counter() - t_start
        manifest = {
            "settings": settings,
            "base": "base",
            "experts": {t: p.name for t, p in expert_paths.items()},
            "tasks": {s: {t: str(p.relative_to(root)) for t, p in by.items()} for s, by in task_paths.items()},
            "scores": scores,
            "parameters": n_params,
            "build_seconds": round(elapsed, 1),
        }
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(root / MANIFEST)
        _log(f"built {root} in {elapsed:.1f}s")
        return Zoo(root=root, base=folders["base"], experts=expert_paths, tasks=task_paths, settings=settings,
                   scores=scores, reused=False, build_seconds=elapsed)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())



def main(argv: Sequence[str] | None = None) -> int:
    """`python -m evomerge.demo.zoo ROOT [--seed N] [--base-steps N] [--expert-steps N] [--force]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m evomerge.demo.zoo", description=main.__doc__)
    ap.add_argument("root", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-steps", type=int, default=500)
    ap.add_argument("--expert-steps", type=int, default=300)
    ap.add_argument("--force", action="store_true", help="rebuild even when a matching cache exists")
    args = ap.parse_args(argv)
    zoo = build_zoo(args.root, seed=args.seed, base_steps=args.base_steps, expert_steps=args.expert_steps,
                    force=args.force)
    for name, sc in zoo.scores.items():
        print(f"{name:14s} {_fmt(sc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
