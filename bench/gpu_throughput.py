"""Benchmark (device check): LoRA training tokens/s and Yes/No scoring samples/s of recalign's own steps
(`llm.lora_step`, `Backbone.score_yes_no`) on randomly initialised 7B-class backbones built from config (no
download), on 1 GPU and on all GPUs of the machine (data-parallel, `torchrun`), each as a share of the
bf16 FLOP bound (a measured bf16 matmul rate x GPUs).

Shapes: `llama-7b` (Llama-2-7B: hidden 4096, 32 layers, 32 heads, MLP 11008) and `qwen-7b` (Qwen2.5-7B:
hidden 3584, 28 layers, 28 query / 4 key-value heads, MLP 18944). The vocabulary is the embedded
tokenizer's (49,152; the real ones have 32,000 and 152,064): scoring computes the LM head at the last position
only and the LoRA loss at the answer positions only, so this moves the FLOPs by well under 1%.

FLOPs counted: 2 x (non-embedding weights) per token run for a forward; a LoRA training token costs a
forward and a backward through frozen weights (input gradients only), 4 x weights; attention is left out
(a few per cent at 256 tokens). Prompts are ~`--tokens` tokens with no shared prefix (prefix cache off).

    .venv/bin/python bench/gpu_throughput.py [--shapes llama-7b,qwen-7b] [--tokens 256] [--batch 16]
        [--train-steps 8] [--score-samples 512] [--gpus all]
    .venv/bin/python bench/gpu_throughput.py --tiny      # CPU smoke run: tiny shapes, 1 vs 2 processes

The parent process starts `torchrun --nproc_per_node N bench/gpu_throughput.py --worker ...` for N = 1 and N =
all GPUs (with --tiny: 1 and 2 CPU processes), reads each run's JSON and prints the table; results go to
bench/results/gpu_throughput.json (not with --tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu_throughput.json"

SHAPES = {
    "llama-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
                 "tie_word_embeddings": False},
    "qwen-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False},
    # --tiny: the same two architectures at test size
    "llama-tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
    "qwen-tiny": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                  "tie_word_embeddings": False},
}


def build_backbone(shape: str, device: torch.device, dtype: torch.dtype, batch_size: int):
    """A random-init backbone of `shape` on `device` (initialised there: no host copy of 7B weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from recalign.llm import Backbone, load_tokenizer

    tokenizer = load_tokenizer("tiny-random")
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tokenizer), max_position_embeddings=4096,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(0)  # every process builds the same weights
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return Backbone(model.eval(), tokenizer, name=shape, batch_size=batch_size, prefix_cache=False)


def body_weights(backbone) -> int:
    """Weights of the decoder's linear layers (what each token multiplies) plus the LM head."""
    return sum(m.in_features * m.out_features for m in backbone.causal_lm.modules() if isinstance(m, torch.nn.Linear))


def prompts_of(tokens: int, n: int, offset: int = 0) -> list[str]:
    words = "user watched liked rated movie drama comedy thriller again before after night family".split()
    return [" ".join(f"{words[(i * 7 + j * 3) % len(words)]}" for j in range(tokens - 8)) + f" item {i + offset}?"
            for i in range(n)]


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a square matmul on this device (the bound the shares refer to)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    rounds, started = 10, time.perf_counter()
    for _ in range(rounds):
        a @ b
    sync(device)
    return 2 * size ** 3 * rounds / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args) -> None:
    """One process of a torchrun launch: measure, main process writes ARGS.result."""
    from recalign import distributed
    from recalign.io import Checkpoints, atomic_write_json
    from recalign.llm import LORA_CONFIG, lora_step, train_section

    processes = distributed.current()
    device = processes.device if processes.active else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bound = matmul_rate(device, dtype, 8192 if device.type == "cuda" else 512)
    rows = []
    for shape in args.shapes.split(","):
        backbone = build_backbone(shape, device, dtype, args.batch)
        weights = body_weights(backbone)
        per_step = args.batch * processes.size  # every process a full micro-batch of --batch
        examples = [(p, "Yes." if i % 2 else "No.") for i, p in enumerate(prompts_of(args.tokens, per_step * args.train_steps))]
        train = train_section(batch_size=args.batch, grad_accum=processes.size, epochs=1, lr=1e-4, patience=0)
        with tempfile.TemporaryDirectory() as tmp:
            sync(device)
            started = time.perf_counter()
            result = lora_step(Checkpoints(tmp), backbone, examples, LORA_CONFIG, train, 0, "train",
                               Path(tmp) / "adapter")
            sync(device)
            train_s = time.perf_counter() - started
        score_prompts = prompts_of(args.tokens, args.score_samples, offset=10_000)
        backbone.score_yes_no(score_prompts[:args.batch * processes.size])  # warm-up
        sync(device)
        started = time.perf_counter()
        backbone.score_yes_no(score_prompts)
        sync(device)
        score_s = time.perf_counter() - started
        score_tokens = sum(len(backbone.tokenize(p)) for p in score_prompts)
        tokens_per_s = result["tokens"] / train_s
        rows.append({"shape": shape, "processes": processes.size, "weights": weights,
                     "train_tokens_per_s": tokens_per_s, "train_tokens": result["tokens"], "train_s": train_s,
                     "train_share_of_bound": 4 * weights * tokens_per_s / (bound * processes.size),
                     "score_samples_per_s": len(score_prompts) / score_s, "score_s": score_s,
                     "score_share_of_bound": 2 * weights * score_tokens / score_s / (bound * processes.size)})
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if processes.main:
        atomic_write_json(Path(args.result), {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                              else "cpu", "dtype": str(dtype).removeprefix("torch."),
                                              "matmul_flops_per_s": bound, "rows": rows})


def launch(processes: int, args, result: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).resolve()), "--worker", "--result", str(result), "--shapes", args.shapes,
               "--tokens", str(args.tokens), "--batch", str(args.batch), "--train-steps", str(args.train_steps),
               "--score-samples", str(args.score_samples)]
    env = {**os.environ, "RECALIGN_QUIET": "1"}
    env.pop("WORLD_SIZE", None)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="llama-7b,qwen-7b")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per process")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--score-samples", type=int, default=512)
    parser.add_argument("--gpus", default="all", help="'all' or a number: the many-process run")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, 1 vs 2 processes (smoke run)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.tiny:
        args.shapes, args.tokens, args.batch, args.train_steps, args.score_samples = \
            "llama-tiny,qwen-tiny", 32, 2, 2, 10
        many = 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU here: run with --tiny for a CPU smoke run")
        many = torch.cuda.device_count() if args.gpus == "all" else int(args.gpus)
    counts = [1] if many == 1 else [1, many]
    with tempfile.TemporaryDirectory(prefix="recalign-gpu-") as tmp:
        runs = {n: launch(n, args, Path(tmp) / f"p{n}.json") for n in counts}
    first = runs[1]
    print(f"{first['device']}, {first['dtype']}, matmul bound {first['matmul_flops_per_s'] / 1e9:,.0f} GFLOP/s "
          f"per device; {args.tokens}-token prompts, micro-batch {args.batch} per process\n")
    print("| shape | processes | LoRA tokens/s | share of bound | scoring samples/s | share of bound |\n"
          "|---|---|---|---|---|---|")
    for n in counts:
        for row in runs[n]["rows"]:
            print(f"| {row['shape']} | {n} | {row['train_tokens_per_s']:.0f} | {row['train_share_of_bound']:.1%} | "
                  f"{row['score_samples_per_s']:.1f} | {row['score_share_of_bound']:.1%} |")
    result = {"command": "bench/gpu_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": {str(n): r for n, r in runs.items()}}
    if not args.tiny:
        from recalign.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
