"""Items per second of our scorer vs lm-eval 0.4.x on the same model and items, in one run.

    python benchmarks/bench_eval.py                       # SmolLM2-135M (GGUF wheel), CPU, KMMLU demo file
    python benchmarks/bench_eval.py --fewshot 2           # k-shot from the dev file
    python benchmarks/bench_eval.py --random-llama-1b --device cuda --dtype bfloat16 --repeat 40

Both sides score the same KMMLU-format items by log-likelihood of the answer letter. lm-eval is timed the way
a search would call it per candidate (HFLM over the in-memory model + simple_evaluate with a prebuilt
TaskManager), and separately at its model level (pre-built requests straight to `HFLM.loglikelihood`).
Our figure is `Evaluator.evaluate` after the one-time tokenization (which is reported too).
"""

from __future__ import annotations

import argparse
import csv
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

YAML = """task: kmmlu_bench
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
"""


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.models.tiny import smollm2_gguf_path

    dtype = getattr(torch, args.dtype)
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


def jsonl_copy(src: Path, dst: Path, repeat: int) -> int:
    rows = list(csv.DictReader(src.read_text(encoding="utf-8").splitlines()))
    n = 0
    with open(dst, "w", encoding="utf-8") as f:
        for r in range(repeat):
            for row in rows:
                f.write(json.dumps(dict(row, id=f"{row['id']}-{r}", answer=int(row["answer"])), ensure_ascii=False) + "\n")
                n += 1
    return n


def timed(fn, reps: int, sync) -> float:
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--random-llama-1b", action="store_true", help="random-weight ~1.1B Llama (for GPUs)")
    ap.add_argument("--fewshot", type=int, default=0, help="k-shot from the dev file (first k of the category)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the 40 demo items this many times")
    ap.add_argument("--reps", type=int, default=2, help="timing repetitions (best is reported)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="our token budget (default: 4096 cpu, 65536 gpu)")
    ap.add_argument("--lm-eval-batch-size", type=int, default=None, help="lm-eval batch size (default: 1 cpu, 32 gpu)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    bt = args.batch_tokens or (65536 if cuda else 4096)
    lbs = args.lm_eval_batch_size or (32 if cuda else 1)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.spec import TaskSpec

    model, tok = load(args)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        n = jsonl_copy(DATA / "kmmlu_ko_demo.csv", d / "test.jsonl", args.repeat)
        jsonl_copy(DATA / "kmmlu_ko_dev.csv", d / "dev.jsonl", 1)
        (d / "kmmlu_bench.yaml").write_text(YAML.format(test=d / "test.jsonl", dev=d / "dev.jsonl"), encoding="utf-8")

        spec = TaskSpec(name="kmmlu", kind="kmmlu", path=str(d / "test.jsonl"), num_fewshot=args.fewshot,
                        fewshot_path=str(d / "dev.jsonl") if args.fewshot else None)
        t = time.perf_counter()
        ev = Evaluator([spec], tok, split="all", device=args.device, batch_tokens=bt)
        prep = time.perf_counter() - t
        plan = ev.tasks["kmmlu"].plan
        ev.evaluate(model)  # warm-up
        ours = timed(lambda: ev.evaluate(model), args.reps, sync)
        our_acc = ev.evaluate(model).metrics["kmmlu"]["acc"]

        tm = TaskManager(include_path=str(d))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=lbs, device=args.device)
        res = {}

        def lm_eval_call():
            res["out"] = lm_eval.simple_evaluate(model=lm, tasks=["kmmlu_bench"], task_manager=tm,
                                                 num_fewshot=args.fewshot or None, log_samples=False,
                                                 bootstrap_iters=0, verbosity="ERROR")

        lm_eval_call()  # warm-up (dataset cache)
        theirs = timed(lm_eval_call, args.reps, sync)
        their_acc = res["out"]["results"]["kmmlu_bench"]["acc,none"]

        # lm-eval's model level only: the same requests, already built
        task = get_task_dict(["kmmlu_bench"], tm)["kmmlu_bench"]
        if args.fewshot:
            task.set_config("num_fewshot", args.fewshot)
        task.build_all_requests(limit=None, rank=0, world_size=1)
        reqs = [r for inst in task.instances for r in [inst]]
        theirs_model = timed(lambda: lm.loglikelihood(reqs, disable_tqdm=True), args.reps, sync)

    print(f"model: {'random Llama' if args.random_llama_1b else 'SmolLM2-135M-Instruct'} {n_params / 1e6:.0f}M params, "
          f"{args.dtype}, {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"items: {n} KMMLU-format questions, {args.fewshot}-shot; ours: {plan.n_tokens} tokens in "
          f"{len(plan.batches)} batches (budget {bt}), tokenized once in {prep:.2f} s; lm-eval batch size {lbs}")
    print(f"acc: ours {our_acc:.4f}  lm-eval {their_acc:.4f}")
    print(f"ours                      {n / ours:8.2f} items/s  ({ours:.2f} s)")
    print(f"lm-eval simple_evaluate   {n / theirs:8.2f} items/s  ({theirs:.2f} s)  -> ours x{theirs / ours:.2f}")
    print(f"lm-eval loglikelihood()   {n / theirs_model:8.2f} items/s  ({theirs_model:.2f} s)  -> ours x{theirs_model / ours:.2f}")


if __name__ == "__main__":
    main()
