"""Prepared tasks: each is built (data read, split chosen, prompts tokenized) once, then `score(model)` many times.

`score` returns (metrics, per_item): metrics maps metric name -> value (always the task's objective metric,
plus ``loss`` = mean negative answer log-likelihood when it is available), per_item maps item id -> details.

Kept as one module on purpose: every task kind shares the preparation (reading, splitting, prompting,
tokenizing once) and the scoring interface, and each kind's code is short.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import random
import sys
from typing import Any

import numpy as np
import torch

from evomerge.errors import ConfigError, DataError
from evomerge.evaluate import prompts
from evomerge.evaluate.data import GenItem, MCQItem, load_items, resolve_path
from evomerge.evaluate.generate import GenPlan, extract_answer, normalize_answer, normalize_number
from evomerge.evaluate.loglik import LoglikPlan, encode_pair
from evomerge.evaluate.spec import TaskSpec
from evomerge.evaluate.splits import make_splits


def _source(spec: TaskSpec) -> str:
    return spec.path or f"{spec.dataset}:{spec.split}" or spec.name


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def context_length(config, tokenizer=None) -> int | None:
    """The longest input a model takes, as lm-eval's HFLM finds it (its prompts are cut from the left to fit):
    the config's n_positions / max_position_embeddings / n_ctx, else the tokenizer's model_max_length."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    model_max = getattr(tokenizer, "model_max_length", None)
    return int(model_max) if model_max and model_max < 10**7 else None


class PreparedTask:
    spec: TaskSpec
    ids: list[str]

    def score(self, model) -> tuple[dict[str, float], dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError


def task_splits(spec: TaskSpec, items: list, source: str, base_dir=None) -> dict[str, list]:
    """{"search", "selection", "heldout", "all"} of a file task: carved out of `items` by `make_splits`, or read
    whole from `heldout_path` / `selection_path`; DataError if a fixed file shares an item with another split."""
    fixed = {"heldout": spec.heldout_path, "selection": spec.selection_path}
    parts = make_splits(items, seed=spec.seed, n_search=spec.n_search,
                        n_heldout=0 if spec.heldout_path else spec.n_heldout, per_category=spec.per_category,
                        source=source, n_selection=spec.n_selection)
    for split, path in fixed.items():
        if path is None:
            continue
        parts[split] = load_items(spec.kind, path=path, subjects=spec.subjects, split=spec.split, base_dir=base_dir)
        key = f"{split}_path"
        mine = {_content(it) for it in parts[split]}
        for other in ("search", "selection", "heldout"):
            if other == split or not parts[other]:
                continue
            shared = [it for it in parts[other] if _content(it) in mine]
            if shared:
                raise DataError(f"{len(shared)} item(s) of the {split} file are also in the {other} split (e.g. "
                                f"{_content(shared[0])[0][:40]!r}): the splits must be disjoint",
                                file=str(resolve_path(path, base_dir)), key=key)
    return parts


def _content(item) -> tuple:
    """What makes two items the same question, whatever their ids (files number their lines apart)."""
    if isinstance(item, MCQItem):
        return (item.question, item.choices)
    return (item.prompt,)


def select_items(spec: TaskSpec, items: list, split: str, source: str, base_dir=None) -> list:
    chosen = task_splits(spec, items, source, base_dir)[split]
    if not chosen:
        raise DataError(f"the '{split}' split of task '{spec.name}' is empty "
                        f"({len(items)} items; n_search={spec.n_search}, n_heldout={spec.n_heldout}, "
                        f"per_category={spec.per_category})", file=source,
                        key={"heldout": "n_heldout", "selection": "n_selection"}.get(split, "n_search"),
                        allowed={"heldout": "set n_heldout (or per_category) to hold items out",
                                 "selection": "set n_selection on every task (or on none)"}.get(split))
    return chosen


def _fewshot_pool(spec: TaskSpec, base_dir) -> tuple[list, bool, str]:
    """The few-shot (dev) items, whether they are the scored split itself, and their source."""
    if spec.fewshot_path or spec.path:
        where = spec.fewshot_path or spec.path
        assert where is not None
        p = resolve_path(where, base_dir)
        if not spec.fewshot_path and not p.is_dir():
            raise DataError(f"num_fewshot={spec.num_fewshot} needs `fewshot_path` (a dev split)", file=str(p),
                            key="fewshot_path", allowed="a dev CSV/JSONL, or a KMMLU folder as `path`")
        pool = load_items(spec.kind, path=where, subjects=spec.subjects, split="dev", base_dir=base_dir)
        if p.is_dir():
            same = spec.split == "dev" and spec.path is not None and resolve_path(spec.path, base_dir) == p
        else:
            same = spec.path is not None and resolve_path(spec.path, base_dir) == p
        return pool, same, str(p)
    pool = load_items(spec.kind, dataset=spec.dataset, subjects=spec.subjects, split="dev")
    return pool, spec.split == "dev", f"{spec.dataset}:dev"


def _contexts(spec: TaskSpec, items: list, tokenizer, base_dir, all_items: list | None = None
              ) -> tuple[list[str], str, list[tuple[str, ...]]]:
    """The full context string of each item (few-shot block, prompt, optional chat template), the delimiter,
    and the ids of each item's few-shot examples. `all_items` is the whole test file in its order (lm-eval's
    shots depend on an item's position in it); default: `items`."""
    shots: dict[str, list] = {}
    if spec.num_fewshot:
        pool, same, where = _fewshot_pool(spec, base_dir)
        if spec.fewshot_order == "lm_eval":
            shots = prompts.lm_eval_shots(all_items if all_items is not None else items, pool, spec.num_fewshot,
                                          seed=spec.fewshot_seed, same_split=same, source=where)
        else:
            if len(pool) < spec.num_fewshot:
                raise DataError(f"num_fewshot={spec.num_fewshot} but the few-shot file has {len(pool)} items",
                                file=where, key="num_fewshot")
            shots = {it.id: prompts.pick_shots(it, pool, spec.num_fewshot) for it in items}
    delim = spec.target_delimiter if spec.kind != "generation" else ""
    ctxs, shot_ids = [], []
    for it in items:
        chosen = shots.get(it.id, [])
        shot_ids.append(tuple(s.id for s in chosen))
        text = prompts.fewshot_prefix(spec.kind, chosen, delim)
        text += prompts.item_prompt(spec.kind, it)
        if spec.chat_template:
            text = prompts.apply_chat(tokenizer, text)
        ctxs.append(text)
    # lm-eval drops the delimiter under a chat template (the assistant turn is already open)
    return ctxs, ("" if spec.chat_template else delim), shot_ids


class MCQTask(PreparedTask):
    """KMMLU / generic multiple choice by log-likelihood: acc, acc_norm (per character), loss."""

    def __init__(self, spec: TaskSpec, items: list[MCQItem], tokenizer, *, device, batch_tokens: int, base_dir=None,
                 max_length: int | None = None, share_prefix: bool = True, max_padding: float | None = None,
                 all_items: list | None = None):
        self.spec, self.items = spec, items
        self.ids = [it.id for it in items]
        ctxs, delim, shots = _contexts(spec, items, tokenizer, base_dir, all_items)
        groups, keys = [], []
        for ctx, it, sh in zip(ctxs, items, shots):
            enc = [encode_pair(tokenizer, ctx, delim + c) for c in it.choices]
            groups.append((enc[0][0], [e[1] for e in enc]))
            # which questions may share a prefix (KV cache computed once): those with the same few-shot block;
            # zero-shot single-token questions all may (a chat template's system turn); else only one question's rows
            single = all(len(e[1]) == 1 for e in enc)
            keys.append(("shots", sh) if spec.num_fewshot else ("all",) if single else None)
        self.plan = LoglikPlan(groups, pad_id=_pad_id(tokenizer), device=device, batch_tokens=batch_tokens,
                               max_length=max_length, source=_source(spec), keys=keys, share_prefix=share_prefix,
                               max_padding=max_padding)
        n_c = [len(it.choices) for it in items]
        c_max = max(n_c)
        # [N, Cmax] gather index into the flat answer vector (padding points at a dummy -inf slot)
        flat = np.full((len(items), c_max), self.plan.n_answers, dtype=np.int64)
        lens = np.ones((len(items), c_max))
        k = 0
        for i, it in enumerate(items):
            flat[i, : n_c[i]] = np.arange(k, k + n_c[i])
            lens[i, : n_c[i]] = [float(len(c)) for c in it.choices]
            k += n_c[i]
        self._flat = torch.from_numpy(flat)
        self._lens = torch.from_numpy(lens)
        self._gold = torch.tensor([it.answer for it in items])

    def score(self, model):
        lls = self.plan.run(model)
        padded = torch.cat([lls, torch.tensor([-float("inf")], dtype=lls.dtype)])[self._flat]  # [N, Cmax]
        pred = padded.argmax(-1)
        pred_norm = (padded / self._lens).argmax(-1)
        gold_ll = padded.gather(1, self._gold[:, None]).squeeze(1)
        gold_prob = torch.softmax(padded, -1).gather(1, self._gold[:, None]).squeeze(1)  # among the choices
        metrics = {
            "acc": float((pred == self._gold).double().mean()),
            "acc_norm": float((pred_norm == self._gold).double().mean()),
            "loss": float(-gold_ll.mean()),
            "gold_prob": float(gold_prob.double().mean()),
        }
        per_item = {
            it.id: {"loglik": padded[i, : len(it.choices)].tolist(), "pred": int(pred[i]), "gold": it.answer,
                    "acc": bool(pred[i] == self._gold[i]), "acc_norm": bool(pred_norm[i] == self._gold[i])}
            for i, it in enumerate(self.items)
        }
        return metrics, per_item


class GenerationTask(PreparedTask):
    """Greedy generation + answer extraction + normalized exact match (and answer log-loss for tie-breaks)."""

    def __init__(self, spec: TaskSpec, items: list[GenItem], tokenizer, *, device, batch_tokens: int, base_dir=None,
                 max_length: int | None = None, max_padding: float | None = None,
                 all_items: list | None = None):
        self.spec, self.items, self.tokenizer = spec, items, tokenizer
        self.ids = [it.id for it in items]
        ctxs, _, _ = _contexts(spec, items, tokenizer, base_dir, all_items)
        prompt_ids = [tokenizer(c)["input_ids"] for c in ctxs]
        self.plan = GenPlan(prompt_ids, tokenizer, max_new_tokens=spec.max_new_tokens, stop=spec.stop, device=device,
                            batch_tokens=batch_tokens)
        self.numeric = [normalize_number(it.answer) is not None for it in items]
        self.gold = [normalize_answer(it.answer) for it in items]
        self.loss_plan = None
        if spec.loss_tiebreak > 0 or spec.continuous_share > 0:  # teacher-forced answer (+ EOS) log-loss per token
            eos = tokenizer.eos_token_id
            groups = []
            for c, it in zip(ctxs, items):
                ctx, cont = encode_pair(tokenizer, c, it.answer)
                groups.append((ctx, [cont + ([eos] if eos is not None else [])]))
            self.n_tok = torch.tensor([len(g[1][0]) for g in groups], dtype=torch.float64)
            self.loss_plan = LoglikPlan(groups, pad_id=_pad_id(tokenizer), device=device, batch_tokens=batch_tokens,
                                        max_length=max_length, source=_source(spec), max_padding=max_padding)

    def score(self, model):
        outputs = self.plan.run(model)
        preds = [normalize_answer(extract_answer(o, regex=self.spec.answer_regex, numeric=num))
                 for o, num in zip(outputs, self.numeric)]
        correct = [p == g for p, g in zip(preds, self.gold)]
        metrics = {"exact_match": float(np.mean(correct))}
        if self.loss_plan is not None:
            per_token = -self.loss_plan.run(model) / self.n_tok
            metrics["loss"] = float(per_token.mean())
            metrics["gold_prob"] = float(torch.exp(-per_token).mean())  # geometric mean of the answer's tokens
        per_item = {it.id: {"output": o, "pred": p, "gold": g, "correct": c, "exact_match": bool(c)}
                    for it, o, p, g, c in zip(self.items, outputs, preds, self.gold, correct)}
        return metrics, per_item


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None, include_defaults: bool):
    """lm-eval's TaskManager, built once per process and folder: indexing the built-in tasks takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=include_defaults)


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval (and the `datasets` it loads through) silent for the duration, restored after: its loggers below
    ERROR (the per-HFLM "`pretrained` model kwarg is not of type `str`", "Building contexts ...", ...), the
    per-task "Building contexts" bar, and datasets' progress bars. The model's bars are off through lm-eval's
    own ``disable_tqdm`` (`_quiet_hflm`)."""
    import datasets
    import lm_eval.api.task as lm_task

    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, lm_task.tqdm
    bars_were_on = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    lm_task.tqdm = functools.partial(bar, disable=True)  # build_all_requests has no option for it
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        lm_task.tqdm = bar
        if bars_were_on:
            datasets.enable_progress_bars()


@functools.cache
def _quiet_hflm():
    """HFLM with every progress bar off (lm-eval's ``disable_tqdm``, which `evaluate` never passes)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    return QuietHFLM


def _yaml_name(yml) -> str | None:
    """The name a local lm-eval YAML defines: its `task:` (a task YAML) or its `group:` (a group YAML, whose
    `task:` lists the subtasks)."""
    import yaml

    try:
        # lm-eval YAMLs may carry tags such as `!function utils.x`: ignore them for the name
        loader: Any = type("_L", (yaml.SafeLoader,), {})
        loader.add_multi_constructor("", lambda *a: None)
        cfg = yaml.load(yml.read_text(encoding="utf-8"), Loader=loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not a valid YAML file: {exc}", file=str(yml), key="lm_eval_yaml") from exc
    if not isinstance(cfg, dict):
        return None
    for key in ("task", "group"):
        if isinstance(cfg.get(key), str) and cfg[key]:
            return cfg[key]
    return None


def _metrics_of(result: dict) -> dict[str, float]:
    """lm-eval's "metric,filter" entries -> {metric: value} ("metric,filter" for filters other than "none")."""
    m: dict[str, float] = {}
    for key, v in result.items():
        if "," in key and "_stderr" not in key and isinstance(v, (int, float)) and not isinstance(v, bool):
            metric, filt = key.split(",", 1)
            m[metric if filt == "none" or metric not in m else f"{metric},{filt}"] = float(v)
    return m


class LmEvalTask(PreparedTask):
    """Any lm-eval task or group (by name, or a local task / group YAML), scored with lm-eval's own requests,
    filters, metrics and group aggregation on the in-memory model (HFLM wrapping the live model: no save / reload).

    Built once per Evaluator: the TaskManager (a local YAML's folder only, without indexing lm-eval's built-in
    tasks unless the YAML refers to them), the Task and Group objects with their loaded documents, the doc subset
    of the split. Each `score` runs `lm_eval.evaluator.evaluate` on those prebuilt tasks and groups with
    ``samples=`` = the split's doc ids, i.e. what `simple_evaluate` does minus its per-call task building,
    seeding of the global RNGs (ours are saved and restored) and environment report (collect_env, git), with
    lm-eval's logging and progress bars off. A group (e.g. ``kmmlu``) is scored leaf by leaf, stratified by leaf;
    its metrics are lm-eval's own aggregate (``aggregate_metric_list``: size-weighted over the scored docs with
    ``weight_by_size: true``, the plain mean of the subtasks otherwise).
    """

    def __init__(self, spec: TaskSpec, tokenizer, *, split: str, base_dir=None, batch_size: int = 16):
        self.spec, self.tokenizer, self.batch_size = spec, tokenizer, batch_size
        with quiet_lm_eval():
            self._load(spec, base_dir)
        for task in self.leaves.values():  # what simple_evaluate applies to each task before evaluating
            if spec.num_fewshot and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        n_docs = {leaf: len(task.eval_docs) for leaf, task in self.leaves.items()}
        multi = len(self.leaves) > 1
        pseudo = [GenItem(f"{leaf}/{i}" if multi else str(i), "", "", leaf)
                  for leaf, n in n_docs.items() for i in range(n)]
        chosen = select_items(spec, pseudo, split, self.where)
        self.ids = [it.id for it in chosen]
        self.samples: dict[str, list[int]] = {}
        for it in chosen:
            self.samples.setdefault(it.category, []).append(int(it.id.rsplit("/", 1)[-1]))
        for leaf in self.samples:  # lm-eval maps its k-th selected doc back to samples[k]: must be ascending
            self.samples[leaf].sort()
        self._lm = None

    def _load(self, spec: TaskSpec, base_dir) -> None:
        name = spec.lm_eval_task
        self.where = where = spec.lm_eval_yaml or "lm_eval_task"
        loaded = None
        if spec.lm_eval_yaml:
            yml = resolve_path(spec.lm_eval_yaml, base_dir)
            if not yml.is_file():
                raise ConfigError("lm-eval task YAML not found", file=str(yml), key="lm_eval_yaml")
            if name is None:
                name = _yaml_name(yml)
                if not name:
                    raise ConfigError("the YAML has no `task:` name (nor a `group:` name)", file=str(yml), key="task")
            self.tm = _task_manager(str(yml.parent), False)
            if name in self.tm.all_tasks:
                try:
                    loaded = self.tm.load([name])
                except Exception:  # e.g. a group of lm-eval's built-in tasks: retried with those indexed
                    loaded = None
            if loaded is None:
                self.tm = _task_manager(str(yml.parent), True)
        else:
            self.tm = _task_manager(None, True)
        assert name is not None
        if name not in self.tm.all_tasks:
            close = [t for t in self.tm.all_tasks if name.split("_")[0] in t][:5]
            raise ConfigError(f"unknown lm-eval task '{name}'", file=where, key="lm_eval_task",
                              allowed=("e.g. " + ", ".join(close)) if close
                              else "a name from `lm-eval ls tasks` or a local YAML")
        self.name = name
        try:
            if loaded is None:
                loaded = self.tm.load([name])
            self.leaves = dict(sorted(loaded["tasks"].items()))
            self.groups = dict(loaded["groups"])
            for task in self.leaves.values():
                len(task.eval_docs)
        except Exception as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise DataError(f"lm-eval could not load the data of task '{name}': {type(exc).__name__}: {first}",
                            file=where, key="lm_eval_task") from exc

    def _hflm(self, model):
        """One HFLM per live model (a search merges in place into the same model object)."""
        if self._lm is None or self._lm._model is not model:
            self._lm = _quiet_hflm()(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        return self._lm

    def score(self, model):
        from lm_eval.evaluator import evaluate

        tasks = {leaf: self.leaves[leaf] for leaf in self.samples}
        state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:  # simple_evaluate's seeds, so sampled few-shot examples (and anything random) repeat per call
            random.seed(0)
            np.random.seed(1234)
            torch.manual_seed(1234)
            for task in tasks.values():
                task.set_fewshot_seed(seed=self.spec.fewshot_seed)
            with quiet_lm_eval():
                lm = self._hflm(model)
                out = evaluate(lm=lm, task_dict={"tasks": tasks, "groups": self.groups,
                                                 "group_map": {g: grp.child_names for g, grp in self.groups.items()}},
                               samples=self.samples, bootstrap_iters=0, log_samples=True,
                               apply_chat_template=self.spec.chat_template, fewshot_as_multiturn=True)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.random.set_rng_state(state[2])
        assert out is not None
        multi = len(self.leaves) > 1
        results = out["results"]
        per_leaf = {leaf: _metrics_of(results[leaf]) for leaf in tasks}
        group = self.groups.get(self.name)
        if group is not None and group.has_aggregation:  # lm-eval's own group aggregate
            metrics = _metrics_of(results[self.name])
        elif multi:  # a group without aggregate_metric_list, or a tag: size-weighted mean over the scored leaves
            sizes = {leaf: len(self.samples[leaf]) for leaf in tasks}
            total = sum(sizes.values())
            common = set.intersection(*(set(m) for m in per_leaf.values()))
            metrics = {k: sum(per_leaf[leaf][k] * sizes[leaf] for leaf in tasks) / total for k in sorted(common)}
        else:
            metrics = per_leaf[self.name] if self.name in per_leaf else next(iter(per_leaf.values()))
        if multi:  # each subgroup's and leaf's own metrics
            for g, grp in self.groups.items():
                if g != self.name and grp.has_aggregation and g in results:
                    metrics.update({f"{g}/{k}": v for k, v in _metrics_of(results[g]).items()})
            for leaf, m in per_leaf.items():
                metrics.update({f"{leaf}/{k}": v for k, v in m.items()})
        per_item: dict[str, Any] = {}
        for leaf in tasks:
            for s in out.get("samples", {}).get(leaf, []):
                item_id = f"{leaf}/{s['doc_id']}" if multi else str(s["doc_id"])
                d = per_item.setdefault(item_id, {"resps": [r for r in s["filtered_resps"]]})
                d.update({k: s[k] for k in s["metrics"] if k in s})
        return metrics, per_item


def import_function(ref: str, base_dir=None):
    """'package.module:function' or 'path/to/file.py:function' -> the callable; ConfigError when absent."""
    mod_name, _, fn_name = ref.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = resolve_path(mod_name, base_dir)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or not path.is_file():
                raise ModuleNotFoundError(str(path))
            module = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(module)
        else:
            if base_dir is not None and str(base_dir) not in sys.path:
                sys.path.insert(0, str(base_dir))
            module = importlib.import_module(mod_name)
        fn = getattr(module, fn_name)
    except (ImportError, AttributeError, FileNotFoundError) as exc:
        raise ConfigError(f"cannot import '{ref}': {exc}", key="function",
                          allowed="'module:function' or 'file.py:function'") from exc
    if not callable(fn):
        raise ConfigError(f"'{ref}' is not callable", key="function")
    return fn


class CustomTask(PreparedTask):
    """A user function fn(model, tokenizer) -> float | dict[str, float]."""

    def __init__(self, spec: TaskSpec, tokenizer, *, base_dir=None):
        self.spec, self.tokenizer = spec, tokenizer
        assert spec.function is not None  # TaskSpec's validator
        self.fn = import_function(spec.function, base_dir)
        self.ids = []

    def score(self, model):
        value = self.fn(model, self.tokenizer)
        if isinstance(value, dict):
            metrics = {k: float(v) for k, v in value.items()}
        else:
            try:
                metrics = {"score": float(value)}
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"'{self.spec.function}' returned {type(value).__name__}, not a number or dict",
                                  key="function") from exc
        if self.spec.objective_metric not in metrics:
            raise ConfigError(f"'{self.spec.function}' returned no '{self.spec.objective_metric}'",
                              key="metric", allowed=", ".join(metrics))
        return metrics, {}


def prepare_task(spec: TaskSpec, tokenizer, *, split: str, device="cpu", batch_tokens: int = 16384, base_dir=None,
                 max_length: int | None = None, share_prefix: bool = True,
                 max_padding: float | None = None) -> PreparedTask:
    """Read, split and tokenize one task."""
    if spec.kind in ("kmmlu", "mcq", "generation"):
        items = load_items(spec.kind, path=spec.path, dataset=spec.dataset, subjects=spec.subjects, split=spec.split,
                           base_dir=base_dir)
        chosen = select_items(spec, items, split, _source(spec), base_dir)
        own_file = {"heldout": spec.heldout_path, "selection": spec.selection_path}.get(split) is not None
        whole = chosen if own_file else items  # the file the items come from, in its order (lm-eval's shots)
        if spec.kind == "generation":
            return GenerationTask(spec, chosen, tokenizer, device=device, batch_tokens=batch_tokens, base_dir=base_dir,
                                  max_length=max_length, max_padding=max_padding, all_items=whole)
        return MCQTask(spec, chosen, tokenizer, device=device, batch_tokens=batch_tokens, base_dir=base_dir,
                       max_length=max_length, share_prefix=share_prefix, max_padding=max_padding,
                       all_items=whole)
    if spec.kind == "lm_eval":
        return LmEvalTask(spec, tokenizer, split=split, base_dir=base_dir)
    return CustomTask(spec, tokenizer, base_dir=base_dir)
