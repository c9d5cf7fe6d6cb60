"""Items per second of our scorer vs lm-eval 0.4.x on the same model and items, zero-shot and k-shot, and tokens per
second of our greedy decoding vs transformers' `generate`, in one run.

    python benchmarks/bench_eval.py                       # SmolLM2-135M (GGUF wheel), CPU, 0-shot, 5-shot, decoding
    python benchmarks/bench_eval.py --bench decode --reps 3
    python benchmarks/bench_eval.py --random-llama-1b --device cuda --dtype bfloat16 --repeat 40 --gen-repeat 8

Decoding (`--bench decode`): the shipped MGSM-style prompts (evomerge/data/tasks/math_mgsm_style.jsonl, 24 prompts
of 21-39 tokens, `--gen-repeat` times) as ONE left-padded batch, greedy, `--max-new-tokens`, per stop set, four ways:
- new: `GenPlan(decode="static")` (static KV cache; finished rows leave the batch; compiled step on CUDA);
- old: `GenPlan(decode="dynamic")` (the dynamic-cache loop, kept as the fallback);
- generate: `model.generate` (dynamic cache, `stop_strings`), and with `cache_implementation="static"` (which
  transformers compiles on CUDA by itself).
tokens/s = the tokens of `generate`'s outputs (up to EOS or the end of the stop string: the same numerator for all
four) / seconds of the whole call (prefill included; the prefill alone is timed too, so decode-only rates show).
Two warm-up calls each (the new path compiles on the second), then best of `--reps`, interleaved; the outputs of all
four are compared (cut at the stop strings).

Both sides score the same KMMLU-format items (evomerge/data/tasks/kmmlu_ko_demo.csv, shots from kmmlu_ko_dev.csv)
by log-likelihood of the answer letter, with the same prompts: lm-eval gets one task per category whose dev split
lists that category's shots first (KMMLU's protocol: k shots from the subject's dev set; the demo dev file has 2 a
category, so 5-shot tops up from the other categories exactly as our `pick_shots` does), `first_n` sampler.
Timed per call, as a search would call it per candidate, after one warm-up of ours:
- ours: `Evaluator.evaluate(model)` (tokenized once at construction; that time is printed too);
- lm-eval end to end: `simple_evaluate` with an HFLM over the in-memory model and a prebuilt TaskManager;
- lm-eval model level: the same requests, prebuilt once, straight to `HFLM.loglikelihood`.
Wall time is best of `--reps`; CPU time (this process) is printed too, as the machine may be shared. The
per-request log-likelihoods of ours and lm-eval's model level are compared (max relative difference).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "evomerge" / "data" / "tasks"

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
output_type: multiple_choice
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n정답："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{answer-1}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.models.tiny import smollm2_gguf_path

    dtype = getattr(torch, args.dtype)
    if args.model:  # a Hugging Face folder (the GPU rehearsal passes its own random models)
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
        return model.eval(), tok
    p = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    if args.random_llama_1b:  # ~1.1B params (TinyLlama shape), random weights, SmolLM2's tokenizer
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype).to(args.device)
    return model.eval(), tok


def rows_of(path: Path) -> list[dict]:
    return [dict(r, answer=int(r["answer"])) for r in csv.DictReader(path.read_text(encoding="utf-8").splitlines())]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_tasks(d: Path, repeat: int) -> tuple[list[str], int]:
    """Our files (all.jsonl, dev.jsonl) and one lm-eval task per category with the same items and shot order."""
    test = [dict(r, id=f"{r['id']}-{k}") for k in range(repeat) for r in rows_of(DATA / "kmmlu_ko_demo.csv")]
    dev = rows_of(DATA / "kmmlu_ko_dev.csv")
    write_jsonl(d / "all.jsonl", test)
    write_jsonl(d / "dev.jsonl", dev)
    names = []
    for i, cat in enumerate(dict.fromkeys(r["Category"] for r in test)):
        name = f"kmmlu_bench_{i}"
        write_jsonl(d / f"{name}_test.jsonl", [r for r in test if r["Category"] == cat])
        # evomerge.evaluate.prompts.pick_shots: same category first, then the others in file order
        write_jsonl(d / f"{name}_dev.jsonl", [r for r in dev if r["Category"] == cat] +
                    [r for r in dev if r["Category"] != cat])
        (d / f"{name}.yaml").write_text(YAML.format(name=name, test=d / f"{name}_test.jsonl",
                                                    dev=d / f"{name}_dev.jsonl"), encoding="utf-8")
        names.append(name)
    return names, len(test)


def clock(fn, sync) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    sync()
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - w, time.process_time() - c


def bench_protocol(shots: int, args, model, tok, d: Path, names: list[str], n: int, sync) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.spec import TaskSpec

    spec = TaskSpec(name="kmmlu", kind="kmmlu", path=str(d / "all.jsonl"), num_fewshot=shots,
                    fewshot_order="file",  # lm-eval's first_n sampler below takes the dev shots in file order
                    fewshot_path=str(d / "dev.jsonl") if shots else None)
    t = time.perf_counter()
    ev = Evaluator([spec], tok, split="all", device=args.device, batch_tokens=args.batch_tokens)
    prep = time.perf_counter() - t
    plan = ev.tasks["kmmlu"].plan  # type: ignore[attr-defined]  # a LoglikTask
    warm = ev.evaluate(model, per_item=True)  # warm-up; also the per-item log-likelihoods for the check

    tm = TaskManager(include_path=str(d), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.lm_eval_batch_size, device=args.device)
    res: dict = {}

    def lm_eval_call():
        res["out"] = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, num_fewshot=shots,
                                             log_samples=False, bootstrap_iters=0)

    # lm-eval's model level: the same requests, built once (as simple_evaluate builds them)
    tasks = tm.load(names)["tasks"]
    reqs = []
    for task in tasks.values():
        task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=None, rank=0, world_size=1)
        reqs += task.instances

    def lm_eval_model():
        res["lls"] = lm.loglikelihood(reqs, disable_tqdm=True)

    times: dict[str, list[tuple[float, float]]] = {"ours": [], "se": [], "ll": []}
    for _ in range(args.reps):  # interleaved, so a busy spell of the machine hits all three alike
        times["ours"].append(clock(lambda: ev.evaluate(model), sync))
        times["se"].append(clock(lm_eval_call, sync))
        times["ll"].append(clock(lm_eval_model, sync))

    # the same numbers? our per-request log-likelihoods vs lm-eval's model level
    theirs: dict[str, list[float]] = {}
    for inst, (ll, _) in zip(reqs, res["lls"]):
        theirs.setdefault(inst.doc["id"], [0.0] * 4)[inst.idx] = ll
    worst = 0.0
    for item_id, d_ in warm.per_item["kmmlu"].items():
        for a, b in zip(d_["loglik"], theirs[item_id]):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-9))
    results = res["out"]["results"]
    their_acc = sum(results[t]["acc,none"] * len(tasks[t].eval_docs) for t in names) / n
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
    return {"shots": shots, "prep": prep, "tokens": plan.n_tokens, "padded": plan.n_padded,
            "batches": len(plan.batches),
            "prefixes": sum(1 for _ in {id(b.prefix) for b in plan.batches if b.prefix is not None}),
            "acc": (warm.metrics["kmmlu"]["acc"], their_acc), "max_rel_diff": worst, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--random-llama-1b", action="store_true", help="random-weight ~1.1B Llama (for GPUs)")
    ap.add_argument("--model", default=None, help="a Hugging Face model folder instead of SmolLM2")
    ap.add_argument("--shots", default="0,5", help="comma-separated k-shot settings (default: 0,5)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the 40 demo items this many times")
    ap.add_argument("--reps", type=int, default=1, help="timed calls of each side (best is reported)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="our token budget (default: 4096 cpu, 65536 gpu)")
    ap.add_argument("--lm-eval-batch-size", type=int, default=None, help="lm-eval batch size (default: 1 cpu, 32 gpu)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bench", default="kmmlu,decode", help="comma-separated: kmmlu (vs lm-eval), decode (vs generate)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="decode: tokens generated per prompt at most")
    ap.add_argument("--stop-sets", default="none,cot", help="decode: comma-separated stop sets: none, direct "
                    "(lm-eval mgsm_direct: blank line, newline), cot (\"Question:\", blank line)")
    ap.add_argument("--gen-repeat", type=int, default=1, help="decode: repeat the 24 prompts this many times (rows)")
    ap.add_argument("--gen-compile", default="auto", choices=["auto", "always", "never"],
                    help="decode: compiled decode step of the new path (auto: on CUDA)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    args.batch_tokens = args.batch_tokens or (65536 if cuda else 4096)
    args.lm_eval_batch_size = args.lm_eval_batch_size or (32 if cuda else 1)
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    model, tok = load(args)
    n_params = sum(p.numel() for p in model.parameters())
    model_name = args.model or ("random Llama" if args.random_llama_1b else "SmolLM2-135M-Instruct")
    benches = args.bench.split(",")
    figures: dict = {"model": model_name, "params": n_params, "dtype": args.dtype, "device": args.device}
    if "decode" in benches:
        figures["decode"] = [bench_decode(args, model, tok, stops, sync) for stops in args.stop_sets.split(",")]
        print_decode(figures["decode"], args, model_name, n_params)
    if "kmmlu" in benches:
        figures["kmmlu"] = bench_kmmlu(args, model, tok, sync, model_name, n_params)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str), encoding="utf-8")


def bench_kmmlu(args, model, tok, sync, model_name: str, n_params: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        names, n = write_tasks(d, args.repeat)
        out = [bench_protocol(int(k), args, model, tok, d, names, n, sync) for k in args.shots.split(",")]

    print(f"\nmodel: {model_name} {n_params / 1e6:.0f}M params, "
          f"{args.dtype}, {args.device}, {torch.get_num_threads()} thread(s); {n} KMMLU-format questions; "
          f"our batch budget {args.batch_tokens} tokens, lm-eval batch size {args.lm_eval_batch_size}; "
          f"best of {args.reps} call(s)")
    for r in out:
        print(f"\n{r['shots']}-shot: ours {r['tokens']} tokens (+{r['padded']} padding) in {r['batches']} batches, "
              f"{r['prefixes']} shared prefixes, tokenized once in {r['prep']:.2f} s; acc ours {r['acc'][0]:.4f} "
              f"lm-eval {r['acc'][1]:.4f}; max rel. log-likelihood diff {r['max_rel_diff']:.1e}")
        ow, oc = r["best"]["ours"]
        print(f"  {'':28s} {'items/s':>8s} {'wall s':>7s} {'ratio':>6s} | {'cpu s':>6s} {'ratio':>6s}")
        for key, label in (("ours", "ours Evaluator.evaluate"), ("se", "lm-eval simple_evaluate"),
                           ("ll", "lm-eval HFLM.loglikelihood")):
            w, c = r["best"][key]
            ratio = "" if key == "ours" else f"x{w / ow:.2f}"
            cratio = "" if key == "ours" else f"x{c / oc:.2f}"
            print(f"  {label:28s} {n / w:8.2f} {w:7.2f} {ratio:>6s} | {c:6.2f} {cratio:>6s}")
    print("\nratio = lm-eval time / our time (ours is that many times faster)")
    return [{"shots": r["shots"], "items": n, "acc": r["acc"], "max_rel_diff": r["max_rel_diff"],
             "seconds": {k: v[0] for k, v in r["best"].items()}, "items_per_s": n / r["best"]["ours"][0]}
            for r in out]


STOP_SETS = {"none": [], "direct": ["\n\n", "\n"], "cot": ["Question:", "\n\n"]}


def bench_decode(args, model, tok, stops: str, sync) -> dict:
    """One stop set: the four paths timed on the same batch (see the module docstring)."""
    from evomerge.evaluate.generate import GenPlan, cut_at_stop, eos_ids

    stop = STOP_SETS[stops]
    rows = [json.loads(line) for line in (DATA / "math_mgsm_style.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [r["prompt"] for r in rows] * args.gen_repeat
    ids = [tok(p)["input_ids"] for p in prompts]
    n_new, big = args.max_new_tokens, 1 << 30  # one batch: every row decodes together, as generate's batch
    plans = {"new": GenPlan(ids, tok, max_new_tokens=n_new, stop=stop, device=args.device, batch_tokens=big,
                            decode="static", compile=args.gen_compile),
             "old": GenPlan(ids, tok, max_new_tokens=n_new, stop=stop, device=args.device, batch_tokens=big,
                            decode="dynamic")}
    prefill = GenPlan(ids, tok, max_new_tokens=1, stop=[], device=args.device, batch_tokens=big, decode="dynamic")
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(args.device)
    tok.padding_side = side
    eos = eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    extra = {"stop_strings": stop, "tokenizer": tok} if stop else {}
    outs: dict[str, list[str]] = {}

    def generate(cache: str | None):
        def call():
            with torch.inference_mode():
                kw = {"cache_implementation": cache} if cache else {}
                g = model.generate(**enc, max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                   **extra, **kw)
            outs["tokens"] = g[:, enc["input_ids"].shape[1]:].tolist()
            return [cut_at_stop(t, stop) for t in tok.batch_decode(outs["tokens"], skip_special_tokens=True)]
        return call

    calls = {"new": functools.partial(plans["new"].run, model), "old": functools.partial(plans["old"].run, model),
             "generate": generate(None), "generate_static": generate("static"),
             "prefill": functools.partial(prefill.run, model)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in calls}

    def timed(key: str) -> tuple[float, float]:
        def call() -> None:
            outs[key] = calls[key]()
        return clock(call, sync)

    for key in calls:  # warm-up: the new path compiles on its second call (CUDA)
        timed(key)
        timed(key)
    for _ in range(args.reps):
        for key in calls:
            times[key].append(timed(key))
    outs["generate"] = generate(None)()
    tokens = sum(next((i for i, t in enumerate(row) if t in eos or t == pad), len(row)) for row in outs["tokens"])
    same = {k: sum(a != b for a, b in zip(outs[k], outs["generate"])) for k in ("new", "old", "generate_static")}
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
    return {"stops": stops, "stop": stop, "rows": len(prompts), "prompt_tokens": plans["old"].n_prompt_tokens,
            "padded_rows_x_length": sum(b[1].numel() for b in plans["old"].batches), "max_new_tokens": n_new,
            "tokens": tokens, "differ_from_generate": same, "new_path": plans["new"].last_path,
            "seconds": {k: v[0] for k, v in best.items()}, "cpu_seconds": {k: v[1] for k, v in best.items()},
            "tokens_per_s": {k: tokens / v[0] for k, v in best.items() if k != "prefill"},
            "tokens_per_cpu_s": {k: tokens / v[1] for k, v in best.items() if k != "prefill"},
            "decode_tokens_per_s": {k: _rate(tokens, v[0] - best["prefill"][0]) for k, v in best.items()
                                    if k != "prefill"},
            "decode_tokens_per_cpu_s": {k: _rate(tokens, v[1] - best["prefill"][1]) for k, v in best.items()
                                        if k != "prefill"}}


def _rate(tokens: int, seconds: float) -> float | None:
    """tokens / seconds; None when the difference of two timings is too small to mean anything."""
    return tokens / seconds if seconds > 1e-3 else None


def _fmt(rate: float | None) -> str:
    return f"{rate:7.1f}" if rate is not None else f"{'-':>7s}"


def print_decode(results: list[dict], args, model_name: str, n_params: int) -> None:
    print(f"\ndecoding: {model_name} {n_params / 1e6:.0f}M params, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} thread(s); best of {args.reps} call(s) after 2 warm-ups")
    labels = {"new": "new: static cache (GenPlan)", "old": "old: dynamic loop (GenPlan)",
              "generate": "transformers generate", "generate_static": "generate, static cache"}
    for r in results:
        print(f"\nstop {r['stops']} {r['stop']}: {r['rows']} prompts ({r['prompt_tokens']} tokens, "
              f"{r['padded_rows_x_length']} with left padding) in one batch, max_new_tokens {r['max_new_tokens']}, "
              f"{r['tokens']} tokens generated; new path ran {r['new_path']}; prefill alone "
              f"{r['seconds']['prefill']:.2f} s (cpu {r['cpu_seconds']['prefill']:.2f} s); outputs differing from "
              f"generate: {r['differ_from_generate']}")
        g, gc = r["seconds"]["generate"], r["cpu_seconds"]["generate"]
        print(f"  {'':30s} {'wall s':>7s} {'tok/s':>7s} {'decode':>7s} {'x gen':>6s} | {'cpu s':>7s} {'tok/s':>7s} "
              f"{'decode':>7s} {'x gen':>6s}")
        for key, label in labels.items():
            w, c = r["seconds"][key], r["cpu_seconds"][key]
            dw, dc = r["decode_tokens_per_s"][key], r["decode_tokens_per_cpu_s"][key]
            print(f"  {label:30s} {w:7.2f} {r['tokens_per_s'][key]:7.1f} {_fmt(dw)} {g / w:6.2f} | {c:7.2f} "
                  f"{r['tokens_per_cpu_s'][key]:7.1f} {_fmt(dc)} {gc / c:6.2f}")
    print("\ntok/s: generated tokens / seconds of the whole call (wall, or CPU time of this process: machines may be "
          "shared); decode: tokens / (seconds - the prefill's); x gen: generate's seconds / this path's (> 1: faster)")


if __name__ == "__main__":
    main()
