"""Benchmark: Yes/No scoring throughput of `Backbone.score_yes_no` (one forward, last-position logits, shared
prefix KV cache) in each number format (float32, bfloat16, int8 = `model.quantize: int8`) against the
generate()-based evaluator of the TALLRec reference code (greedy `generate` with `output_scores=True`, score read
from the first generated step, float32), on the same model, the same samples, in the same process; plus LoRA
training throughput (tokens/s) with the answer-only and all-token losses in float32 and bfloat16.

Each format's speed is also given as a share of what this machine's matmul kernel for that format reaches on a
model-shaped product (`llm.precision.matmul_rate`): achieved GFLOP/s counts the linear layers only (2 x weights x
tokens actually run, padding included; attention adds a few per cent at these prompt lengths).

Rounds are interleaved (A, B, C, A, B, C, ...) so that load from other processes hits every evaluator
alike; medians are reported.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/llm_scoring.py [--samples 32] [--rounds 2]
        [--formats fp32,bf16,int8] [--max-new-tokens 128] [--model smollm2-135m-instruct] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "llm_scoring.json"
# format -> (model.dtype, model.quantize, matmul kernel measured for it)
FORMATS = {"fp32": ("float32", "none", "float32"), "bf16": ("bfloat16", "none", "bfloat16"),
           "int8": ("float32", "int8", "int8")}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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


def linear_flops(backbone, prompts, prefix_cache: bool, batch_size: int) -> float:
    """FLOPs of the linear layers in one `score_yes_no` call: decoder weights x tokens run (the shared prefix
    once when cached, padded suffix batches) + the LM head at one position per prompt."""
    body = getattr(backbone.causal_lm, backbone.causal_lm.base_model_prefix)
    weights = sum(m.in_features * m.out_features for m in body.modules() if isinstance(m, torch.nn.Linear))
    head = backbone.hidden_size * len(backbone.tokenizer)
    prefix, tokens = backbone.scoring_tokens(prompts, prefix_cache, batch_size)
    return 2.0 * (weights * tokens + head * (len(prompts) + (1 if prefix else 0)))


def render(backbone, prompt_cfg, ds, frame) -> list[str]:
    """TALLRec prompts of a sample frame, as the TALLRec method renders them."""
    from recalign.llm import Prompter
    from recalign.tasks.text import frame_fields

    prompter = Prompter(prompt_cfg, backbone.tokenizer, prompt_cfg["wrapper"], prompt_cfg["system"],
                        prompt_cfg["max_tokens"], backbone.count_tokens)
    return prompter.render_all(frame_fields(frame, ds.titles(), ds.domain))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", default=None, help="a peft adapter directory to load first (e.g. a TALLRec run)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--formats", default=None, help="comma-separated fp32, bf16, int8 (default: all three on "
                                                        "the CPU, fp32 and bf16 on CUDA)")
    parser.add_argument("--dtype", default=None, help="one format only (float32, bfloat16, ...); same as --formats")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the reference evaluator's default is 128")
    parser.add_argument("--train-examples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECALIGN_THREADS", "2")))
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from recalign.data import load_dataset
    from recalign.io import atomic_write_json
    from recalign.llm import Backbone, LoraSettings, TrainConfig, train_lora
    from recalign.llm.loading import pick_device
    from recalign.llm.precision import cpu_info, matmul_rate
    from recalign.tasks.ctr import TALLREC_PROMPT, TALLREC_SAMPLES, tallrec_protocol

    device = pick_device(args.device)
    names = args.formats or args.dtype or ("fp32,bf16,int8" if device.type == "cpu" else "fp32,bf16")
    formats = [ALIASES.get(f.strip(), f.strip()) for f in names.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: unknown {', '.join(unknown)}; use {', '.join(FORMATS)}")

    rates = {}
    if device.type == "cpu":
        for fmt in formats:
            rates[fmt] = matmul_rate(FORMATS[fmt][2])
            print(f"matmul {fmt} (model-shaped {FORMATS[fmt][2]} kernel): {rates[fmt]:.0f} GFLOP/s", flush=True)

    ds = load_dataset("ml-100k")
    data = tallrec_protocol(ds, {**TALLREC_SAMPLES, "valid_size": args.samples, "test_size": args.train_examples})
    backbones = {}
    for fmt in formats:
        dtype, quantize, _ = FORMATS[fmt]
        backbones[fmt] = Backbone.load(args.model, dtype=dtype, quantize=quantize, device=args.device,
                                       batch_size=args.batch_size)
        if args.adapter:
            backbones[fmt].load_adapter(args.adapter)
    first = backbones[formats[0]]
    prompt_cfg = TALLREC_PROMPT
    prompts = render(first, prompt_cfg, ds, data.valid)
    yes, no = prompt_cfg["yes"], prompt_cfg["no"]
    tokens = [first.count_tokens(p) for p in prompts]
    print(f"{len(prompts)} prompts, {statistics.mean(tokens):.0f} tokens on average "
          f"(shared prefix {first.scoring_tokens(prompts, True)[0]} tokens), batch {args.batch_size}", flush=True)

    evaluators = {}  # (format, evaluator name) -> (fn, prefix cache or None)
    for fmt, backbone in backbones.items():
        for cached in (True, False):
            evaluators[(fmt, "score_yes_no (prefix cache)" if cached else "score_yes_no (no cache)")] = (
                lambda b=backbone, c=cached: (b.score_yes_no(prompts, yes, no, prefix_cache=c), 1), cached)
    reference_fmt = "fp32" if "fp32" in backbones else formats[0]
    reference = (reference_fmt, f"generate, max_new_tokens={args.max_new_tokens}")
    evaluators[reference] = (lambda b=backbones[reference_fmt]: generate_scores(
        b, prompts, yes, no, args.max_new_tokens, args.batch_size), None)
    # one untimed call each first: CUDA context and kernels, the int8 quantisation, first-call allocations
    head = prompts[: args.batch_size]
    for backbone in backbones.values():
        for cached in (True, False):
            backbone.score_yes_no(head, yes, no, prefix_cache=cached)
    generate_scores(backbones[reference_fmt], head, yes, no, 2, args.batch_size)

    times = {key: [] for key in evaluators}
    scores, steps = {}, {}
    for r in range(args.rounds):
        for key, (fn, _) in evaluators.items():
            started = time.perf_counter()
            scores[key], steps[key] = fn()
            times[key].append(time.perf_counter() - started)
            print(f"round {r + 1}: {key[0]} {key[1]}: {len(prompts) / times[key][-1]:.2f} samples/s", flush=True)
    rows = []
    for key, (_, cached) in evaluators.items():
        fmt, name = key
        median = statistics.median(times[key])
        row = {"format": fmt, "evaluator": name, "median_seconds": median, "samples_per_s": len(prompts) / median,
               "speedup_vs_generate": statistics.median(times[reference]) / median,
               "max_abs_diff_vs_generate": float((scores[key] - scores[reference]).abs().max()), "rounds": times[key]}
        if cached is not None:
            row["gflops"] = linear_flops(backbones[fmt], prompts, cached, args.batch_size) / median / 1e9
            if fmt in rates:
                row["matmul_gflops"] = rates[fmt]
                row["share_of_matmul"] = row["gflops"] / rates[fmt]
        rows.append(row)

    train_rows = []
    shots = data.test
    examples = list(zip(render(first, prompt_cfg, ds, shots),
                        [prompt_cfg["yes"] if label else prompt_cfg["no"] for label in shots["label"]]))
    for fmt, backbone in backbones.items():
        if backbone.quantize != "none":
            continue  # int8 is for scoring only
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
            train_rows.append({"format": fmt, "loss": label, "examples": len(examples),
                               "tokens": result.tokens, "seconds": result.seconds,
                               "tokens_per_s": result.tokens / result.seconds,
                               "examples_per_s": len(examples) / result.seconds})
            print(f"LoRA training {fmt} ({label}): {train_rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)

    print()
    print(f"| format | evaluator | samples/s (median of {args.rounds}) | speed-up vs generate | "
          "max |score diff| vs generate | GFLOP/s (linear layers) | share of matmul rate |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        share = (f"{row['share_of_matmul']:.0%} of {row['matmul_gflops']:.0f}" if "share_of_matmul" in row else "–")
        gflops = f"{row['gflops']:.0f}" if "gflops" in row else "–"
        print(f"| {row['format']} | {row['evaluator']} | {row['samples_per_s']:.2f} | "
              f"{row['speedup_vs_generate']:.1f}x | {row['max_abs_diff_vs_generate']:.2e} | {gflops} | {share} |")
    print()
    print("| format | LoRA training (r=8, q/v, batch 4), loss | tokens/s | examples/s |")
    print("|---|---|---|---|")
    for row in train_rows:
        print(f"| {row['format']} | {row['loss']} | {row['tokens_per_s']:.0f} | {row['examples_per_s']:.2f} |")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.results), {
        "machine": {"cpu": cpu_info()[0], "cpus": os.cpu_count(), "threads": args.threads,
                    "platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "precision": {fmt: b.precision for fmt, b in backbones.items()}, "matmul_gflops": rates,
        "args": vars(args), "mean_prompt_tokens": statistics.mean(tokens), "scoring": rows, "training": train_rows,
        "generate_steps_last_round": steps[reference],
    })
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
