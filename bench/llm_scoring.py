"""Benchmark: Yes/No scoring throughput of `Backbone.score_yes_no` (one forward, last-position logits, shared
prefix KV cache) against the generate()-based evaluator of the TALLRec reference code (greedy `generate`
with `output_scores=True`, score read from the first generated step), on the same model, the same samples,
in the same process; plus LoRA training throughput (tokens/s) with the answer-only and all-token losses.

Rounds are interleaved (A, B, C, A, B, C, ...) so that load from other processes hits every evaluator
alike; medians are reported.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/llm_scoring.py [--samples 32] [--rounds 3]
        [--max-new-tokens 128] [--model smollm2-135m-instruct] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "llm_scoring.json"


def generate_scores(backbone, prompts, yes, no, max_new_tokens, batch_size):
    """What the reference evaluator does: generate, then read the first step's logits for Yes / No."""
    y, n = backbone.yes_no_ids(yes, no)
    out = torch.empty(len(prompts))
    generated = 0
    with backbone.evaluating():
        for start in range(0, len(prompts), batch_size):
            batch = list(range(start, min(start + batch_size, len(prompts))))
            enc = backbone.encode([prompts[i] for i in batch])
            result = backbone.model.generate(
                input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True,
                pad_token_id=backbone.pad_id, eos_token_id=backbone.tokenizer.eos_token_id)
            first = result.scores[0].float()
            out[batch] = (first[:, y] - first[:, n]).cpu()
            generated += len(result.scores)
    return out, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default=None, help="a peft adapter directory to load first (e.g. a TALLRec run)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="auto = float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the reference evaluator's default is 128")
    parser.add_argument("--train-examples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECALIGN_THREADS", "2")))
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from recalign.data import load_dataset
    from recalign.llm import Backbone, LoraSettings, TrainConfig, ctr, train_lora

    ds = load_dataset("ml-100k")
    data = ctr.prepare(ds, {**ctr.SAMPLE_DEFAULTS, "valid_size": args.samples, "test_size": args.train_examples})
    backbone = Backbone.load(args.model, dtype=args.dtype, batch_size=args.batch_size)
    if args.adapter:
        backbone.load_adapter(args.adapter)
    prompt_cfg = ctr.TALLREC_PROMPT
    prompts = ctr.render_prompts(ds, data.valid, prompt_cfg, backbone.tokenizer, backbone.count_tokens)
    yes, no = prompt_cfg["yes"], prompt_cfg["no"]
    tokens = [backbone.count_tokens(p) for p in prompts]
    print(f"{len(prompts)} prompts, {statistics.mean(tokens):.0f} tokens on average "
          f"(shared prefix {_prefix(backbone, prompts)} tokens), batch {args.batch_size}", flush=True)

    evaluators = {
        "score_yes_no (prefix cache)": lambda: (backbone.score_yes_no(prompts, yes, no, prefix_cache=True), 1),
        "score_yes_no (no cache)": lambda: (backbone.score_yes_no(prompts, yes, no, prefix_cache=False), 1),
        f"generate, max_new_tokens={args.max_new_tokens}":
            lambda: generate_scores(backbone, prompts, yes, no, args.max_new_tokens, args.batch_size),
    }
    if backbone.device.type == "cuda":  # one untimed call each first: CUDA context, kernels, allocator
        head = prompts[: args.batch_size]
        for cached in (True, False):
            backbone.score_yes_no(head, yes, no, prefix_cache=cached)
        generate_scores(backbone, head, yes, no, 2, args.batch_size)
    times = {name: [] for name in evaluators}
    scores, steps = {}, {}
    for r in range(args.rounds):
        for name, fn in evaluators.items():
            started = time.perf_counter()
            scores[name], steps[name] = fn()
            times[name].append(time.perf_counter() - started)
            print(f"round {r + 1}: {name}: {len(prompts) / times[name][-1]:.2f} samples/s", flush=True)
    reference = list(evaluators)[-1]
    rows = []
    for name in evaluators:
        median = statistics.median(times[name])
        diff = float((scores[name] - scores[reference]).abs().max())
        rows.append({"evaluator": name, "median_seconds": median, "samples_per_s": len(prompts) / median,
                     "speedup_vs_generate": statistics.median(times[reference]) / median,
                     "max_abs_diff_vs_generate": diff, "rounds": times[name]})

    train_rows = []
    shots = data.test
    examples = list(zip(ctr.render_prompts(ds, shots, prompt_cfg, backbone.tokenizer, backbone.count_tokens),
                        ctr.answers(shots["label"], prompt_cfg)))
    if backbone.device.type == "cuda":  # untimed warm-up of the backward kernels
        backbone.add_lora(LoraSettings())
        train_lora(backbone, examples[:8], TrainConfig(epochs=1, batch_size=4, lr=1e-4, patience=0))
    for label, answer_only, prefix in (("answer-only, shared-prefix KV cache", True, True),
                                       ("answer-only, no prefix cache", True, False),
                                       ("all tokens (reference code's loss)", False, False)):
        backbone.remove_lora()
        backbone.prefix_cache = prefix
        torch.manual_seed(0)
        backbone.add_lora(LoraSettings())
        result = train_lora(backbone, examples, TrainConfig(epochs=1, batch_size=4, lr=1e-4, patience=0),
                            answer_only=answer_only)
        train_rows.append({"loss": label, "examples": len(examples),
                           "tokens": result.tokens, "seconds": result.seconds,
                           "tokens_per_s": result.tokens / result.seconds,
                           "examples_per_s": len(examples) / result.seconds})
        print(f"LoRA training ({train_rows[-1]['loss']}): {train_rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)

    print()
    print(f"| evaluator | samples/s (median of {args.rounds}) | speed-up vs generate | max |score diff| |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['evaluator']} | {row['samples_per_s']:.2f} | {row['speedup_vs_generate']:.1f}x | "
              f"{row['max_abs_diff_vs_generate']:.2e} |")
    print()
    print("| LoRA training (r=8, q/v, batch 4), loss | tokens/s | examples/s |")
    print("|---|---|---|")
    for row in train_rows:
        print(f"| {row['loss']} | {row['tokens_per_s']:.0f} | {row['examples_per_s']:.2f} |")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    from recalign.io import atomic_write_json

    atomic_write_json(Path(args.results), {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(backbone.device), "dtype": str(backbone.dtype),
                    "gpu": torch.cuda.get_device_name() if backbone.device.type == "cuda" else None},
        "args": vars(args), "mean_prompt_tokens": statistics.mean(tokens), "scoring": rows, "training": train_rows,
        "generate_steps_last_round": steps[reference],
    })
    print(f"\nwrote {args.results}")


def _prefix(backbone, prompts) -> int:
    from recalign.llm.backbone import _common_prefix_length

    return _common_prefix_length([backbone.tokenize(p) for p in prompts])


if __name__ == "__main__":
    main()
