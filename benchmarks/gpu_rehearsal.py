"""A one-command rehearsal of evomerge on a CUDA machine; writes ONE JSON with every figure.

    python benchmarks/gpu_rehearsal.py                          # CUDA: ~1B and ~8B random Llamas, 20 candidates
    python benchmarks/gpu_rehearsal.py --sizes 1b --candidates 8 --out r.json
    python benchmarks/gpu_rehearsal.py --device cpu --tiny      # tiny Llamas, 4 candidates (the CPU smoke test)

1. the GPU tests (`pytest tests/test_gpu.py`), 2. the merge and evaluation benchmarks (benchmarks/bench_merge.py
and bench_eval.py with `--device`; run as subprocesses, their output kept), 3. per size and merge method (TIES,
DARE-TIES): a search through `evomerge.workflow.run.start_run` on random-weight Llamas (base + 3 experts =
base + small perturbations, benchmarks/rehearsal_models.py) scored on a KMMLU-format task
(evomerge/data/tasks/kmmlu_ko_demo.csv) and a generation task (math_mgsm_style.jsonl), with per candidate:
- merge and evaluation seconds (the run's trials: `RunStore.open(run_dir).trials()`);
- merge / floor: floor = bytes a merge must move (base + deltas read, the live model written) / copy bandwidth
  measured on the device;
- evaluation MFU = 2 x params x tokens / seconds / (`--peak-tflops` x 1e12), tokens = the log-likelihood batches'
  tokens + the generation prompts' + rows x max_new_tokens (what the decode computes with random weights, which
  rarely stop early);
- peak memory (`torch.cuda.max_memory_allocated`; on CPU the process's peak RSS) vs `plan_memory`'s total;
- the best candidate (and `--mergekit-candidates` - 1 more) merged by `mergekit-yaml RECIPE OUT --cuda` (CPU:
  `--device cpu`) and reloaded with transformers, timed next to evomerge's merge of the same recipe (mergekit's
  seconds are the subprocess's: its start-up, ~10 s of imports, included, as a user pays it).
CUDA-only code (synchronize, memory statistics, bf16 on the device) runs only when `--device cuda` and CUDA exist.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT / "evomerge" / "data" / "tasks"

import rehearsal_models as rm  # noqa: E402  (after the path set-up)
from bench_merge import copy_bandwidth, sync  # noqa: E402


def cuda_on(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def release(device: str) -> None:
    """Free what a finished run leaves behind (its live model, compiled graphs, CUDA graph pools, cached blocks):
    mergekit's subprocess and the next search need the device's memory."""
    gc.collect()
    if cuda_on(device):
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def run_cmd(cmd: list[str], timeout: float, env: dict | None = None) -> dict[str, Any]:
    """A subprocess from the repository root: rc, seconds, the end of its output."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        def text(x: str | bytes | None) -> str:
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

        rc, out = 124, f"timed out after {timeout} s\n{text(exc.stdout)}{text(exc.stderr)}"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": time.perf_counter() - t0, "output_tail": str(out)[-6000:]}


def gpu_tests(args) -> dict[str, Any]:
    res = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], 1800)
    lines = [ln for ln in res["output_tail"].splitlines() if ln.strip()]
    res["summary"] = lines[-1] if lines else ""
    return res


def benchmarks(args, work: Path, tiny_model: Path | None) -> dict[str, Any]:
    merge = [sys.executable, "benchmarks/bench_merge.py", "--device", args.device]
    ev = [sys.executable, "benchmarks/bench_eval.py", "--device", args.device, "--json", str(work / "bench_eval.json")]
    if args.tiny:  # seconds, not minutes: the smallest settings each benchmark takes
        merge += ["--sets", "synthetic", "--params", "2e5", "--hidden", "64", "--repeats", "1", "--dtypes", "float32"]
        ev += ["--model", str(tiny_model), "--bench", "decode", "--stop-sets", "none", "--max-new-tokens", "4"]
    else:
        ev += ["--dtype", "bfloat16", "--random-llama-1b", "--repeat", "40", "--gen-repeat", "8", "--reps", "3"]
    out = {"merge": run_cmd(merge, args.bench_timeout), "eval": run_cmd(ev, args.bench_timeout)}
    if (work / "bench_eval.json").exists():
        out["eval"]["figures"] = json.loads((work / "bench_eval.json").read_text(encoding="utf-8"))
    return out


def task_specs(tiny: bool) -> list[dict[str, Any]]:
    k, g = (8, 4) if tiny else (32, 16)
    return [{"name": "kmmlu", "kind": "kmmlu", "path": str(DATA / "kmmlu_ko_demo.csv"), "n_search": k,
             "n_heldout": 4},
            {"name": "math", "kind": "generation", "path": str(DATA / "math_mgsm_style.jsonl"), "n_search": g,
             "n_heldout": 2 if tiny else 8, "max_new_tokens": 8 if tiny else 32, "stop": ["\n\n", "Question:"]}]


def eval_tokens(specs: list[dict[str, Any]], tokenizer, device: str) -> tuple[int, int]:
    """(tokens one evaluation computes, longest sequence): built with the run's own task preparation."""
    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.spec import TaskSpec

    ev = Evaluator([TaskSpec(**s) for s in specs], tokenizer, split="search", device=device)
    tokens, longest = 0, 1
    for task in ev.tasks.values():
        plan = task.plan  # type: ignore[attr-defined]
        if hasattr(plan, "n_prompt_tokens"):  # GenPlan
            tokens += plan.n_prompt_tokens + plan.n * plan.max_new_tokens
            longest = max([longest] + [ids.shape[1] for _, ids, _ in plan.batches])
        else:  # LoglikPlan
            tokens += plan.n_tokens
            longest = max([longest] + [b.input_ids.shape[1] + (0 if b.prefix is None else b.prefix.shape[1])
                                       for b in plan.batches])
    return tokens, longest


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "mean": statistics.fmean(xs)}


def peak_bytes(device: str) -> tuple[int, str]:
    if cuda_on(device):
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS of the process (host)"


def memory_plan(config, method: str, args, specs, longest: int) -> dict[str, Any]:
    from evomerge.models.memory import plan_memory

    kw: dict[str, Any] = {"device_type": "cuda" if cuda_on(args.device) else "cpu"}
    if cuda_on(args.device):
        kw["device_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    try:
        plan = plan_memory(config, n_experts=3, method=method, dtype="bfloat16", max_seq_len=longest,
                           max_new_tokens=max(int(s.get("max_new_tokens", 32)) for s in specs), **kw)
    except (TypeError, ValueError) as exc:  # the plan's signature is someone else's to change
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"total": plan.total, "layout": plan.layout, "offload": plan.offload, "fits": plan.fits,
            "model_bytes": plan.model_bytes, "items": {it.key: it.bytes for it in plan.items}}


def mergekit_side_by_side(trials, run_dir: Path, args, work: Path) -> list[dict[str, Any]]:
    """The best trial (and more, best first) merged by mergekit-yaml and reloaded; evomerge's seconds beside."""
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    ok = sorted((t for t in trials if t.status == "ok" and t.values), key=lambda t: -t.values[0])
    out = []
    for t in ok[: args.mergekit_candidates]:
        recipe = run_dir / f"mergekit_trial_{t.number}.yaml"
        recipe.write_text(t.recipe_yaml, encoding="utf-8")
        dest = work / f"mergekit_{run_dir.name}_{t.number}"
        device_flags = ["--cuda"] if cuda_on(args.device) else ["--device", "cpu"]
        res = run_cmd([exe, str(recipe), str(dest), *device_flags, "--quiet"], args.bench_timeout)
        item = {"trial": t.number, "mergekit_rc": res["rc"], "mergekit_seconds": res["seconds"],
                "evomerge_merge_seconds": t.merge_seconds}
        if res["rc"] != 0:
            item["mergekit_output_tail"] = res["output_tail"][-2000:]
        else:
            from transformers import AutoModelForCausalLM

            sync(args.device)
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16).to(args.device)
            sync(args.device)
            item["reload_seconds"] = time.perf_counter() - t0
            item["mergekit_plus_reload_over_evomerge"] = ((item["mergekit_seconds"] + item["reload_seconds"])
                                                          / max(t.merge_seconds or 0.0, 1e-9))
            del model
            release(args.device)
        shutil.rmtree(dest, ignore_errors=True)  # 16 GB for an 8B model
        out.append(item)
    return out


def rehearse(size: str, method: str, family: dict[str, Any], args, work: Path, bandwidth: float) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from evomerge.store import RunStore
    from evomerge.workflow.run import start_run

    specs = task_specs(args.tiny)
    folders = family["folders"]
    space = {"name": f"rehearsal-{size}-{method}", "models": {k: str(v) for k, v in folders.items()},
             "base_model": "base", "merge_method": method,
             "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}},
             "granularity": "layer", "tasks": specs, "optimizer": {"name": "cmaes"},
             "budget": {"trials": args.candidates}, "heldout": {"top_k": 1, "sources": False, "baselines": False},
             "seed": 0, "device": args.device, "dtype": "bfloat16"}
    if args.threads:
        space["threads"] = args.threads
    space_file = work / f"{space['name']}.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tokens, longest = eval_tokens(specs, AutoTokenizer.from_pretrained(folders["base"]), "cpu")
    release(args.device)
    if cuda_on(args.device):
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    t0 = time.perf_counter()
    run_dir = Path(start_run(space_file, run_dir=work / "runs" / space["name"], quiet=True, overwrite=True))
    sync(args.device)
    run_seconds = time.perf_counter() - t0
    peak, peak_source = peak_bytes(args.device)
    release(args.device)
    store = RunStore.open(run_dir)
    trials = store.trials()
    store.close()
    done = [t for t in trials if t.status == "ok" and t.merge_seconds and t.eval_seconds]
    if not done:
        raise RuntimeError(f"no successful trial in {run_dir}: {[(t.number, t.status, t.error) for t in trials]}")
    merge_s = [float(t.merge_seconds or 0.0) for t in done]
    eval_s = [float(t.eval_seconds or 0.0) for t in done]
    moved = (2 + 3) * family["params"] * 2  # base + 3 deltas read, the live model written, bfloat16
    floor = moved / bandwidth
    flops = 2 * family["params"] * tokens
    peak_flops = args.peak_tflops * 1e12
    plan = memory_plan(family["config"], method, args, specs, longest)
    out: dict[str, Any] = {
        "size": size, "method": method, "params": family["params"], "perturbed_fraction": family["perturbed_fraction"],
        "candidates": len(trials), "ok": len(done), "run_seconds": run_seconds, "run_dir": str(run_dir),
        "trials": [{"number": t.number, "status": t.status, "merge_seconds": t.merge_seconds,
                    "eval_seconds": t.eval_seconds, "fitness": t.value} for t in trials],
        "merge_seconds": stats(merge_s), "eval_seconds": stats(eval_s),
        "merge_bytes_moved": moved, "merge_floor_seconds": floor,
        "merge_over_floor": stats([m / floor for m in merge_s]),
        "eval_tokens": tokens, "eval_flops": flops, "eval_mfu": stats([flops / e / peak_flops for e in eval_s]),
        "peak_memory_bytes": peak, "peak_memory_source": peak_source, "memory_plan": plan,
    }
    if "total" in plan:
        out["peak_over_plan"] = peak / plan["total"]
    out["mergekit"] = mergekit_side_by_side(trials, run_dir, args, work)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny Llamas, 4 candidates, small tasks (CPU smoke test)")
    ap.add_argument("--sizes", default=None, help="comma-separated: tiny, 1b, 8b (default: 1b,8b; tiny with --tiny)")
    ap.add_argument("--methods", default="ties,dare_ties")
    ap.add_argument("--candidates", type=int, default=None, help="candidates per search (default 20; 4 with --tiny)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak of the device (H100 SXM bf16 dense: 989)")
    ap.add_argument("--mergekit-candidates", type=int, default=1, help="trials merged by mergekit too (best first)")
    ap.add_argument("--out", default="gpu_rehearsal.json")
    ap.add_argument("--workdir", default=None, help="where models and runs go (default: a temporary folder)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--keep-models", action="store_true", help="keep each size's model folders after its searches")
    ap.add_argument("--skip-benchmarks", action="store_true")
    ap.add_argument("--bench-timeout", type=float, default=3600.0, help="seconds per benchmark subprocess")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads here and in the searches")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device (use --device cpu --tiny)")
    sizes = (args.sizes or ("tiny" if args.tiny else "1b,8b")).split(",")
    args.candidates = args.candidates or (4 if args.tiny else 20)
    t_start = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="evomerge_rehearsal_")
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": {
        "device": args.device, "device_name": torch.cuda.get_device_name(0) if cuda_on(args.device)
        else platform.processor() or platform.machine(), "torch": torch.__version__,
        "python": platform.python_version(), "tiny": args.tiny, "sizes": sizes, "methods": args.methods.split(","),
        "candidates": args.candidates, "peak_tflops": args.peak_tflops, "threads": torch.get_num_threads()}}
    try:
        bandwidth = copy_bandwidth(args.device, (1 << 30) if cuda_on(args.device) else (64 << 20))
        report["meta"]["copy_bandwidth_bytes_per_s"] = bandwidth
        if not args.skip_tests:
            report["gpu_tests"] = gpu_tests(args)
        report["searches"] = []
        for i, size in enumerate(sizes):  # one family on disk at a time: an 8B family is tens of GB
            tok = rm.tokenizer_for(size)
            shared = rm.disk_plan(work, rm.n_params(rm.llama_config(size, tok)), 3)
            t0 = time.perf_counter()
            fam = rm.write_family(work / size, size, tok, device=args.device if cuda_on(args.device) else "cpu",
                                  shared=shared)
            fam["write_seconds"] = time.perf_counter() - t0
            if i == 0 and not args.skip_benchmarks:
                report["benchmarks"] = benchmarks(args, work, fam["folders"]["base"])
            for method in args.methods.split(","):
                try:
                    r = rehearse(size, method, fam, args, work, bandwidth)
                except Exception as exc:  # noqa: BLE001  (one failed search must not cost the other figures)
                    tail = traceback.format_exc()[-4000:]
                    report["searches"].append({"size": size, "method": method, "error": repr(exc), "traceback": tail})
                    print(f"{size} {method}: FAILED {exc!r}", flush=True)
                    continue
                r["models_write_seconds"] = fam["write_seconds"]
                report["searches"].append(r)
                print(f"{size} {method}: {r['ok']}/{r['candidates']} candidates, merge "
                      f"{r['merge_seconds']['median']:.3f} s ({r['merge_over_floor']['median']:.1f}x floor), "
                      f"eval {r['eval_seconds']['median']:.3f} s (MFU {r['eval_mfu']['median']:.2%}), "
                      f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
            if not args.keep_models:
                shutil.rmtree(work / size, ignore_errors=True)
    finally:
        report["meta"]["seconds_total"] = time.perf_counter() - t_start
        Path(args.out).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        print(f"wrote {args.out}")
        if tmp is not None:
            tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
