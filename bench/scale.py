"""Benchmark: one process vs N data-parallel processes on this machine, for the same short TALLRec run (LoRA
training on `--shots` samples, then Yes/No scoring of the valid and test samples) with the real embedded
SmolLM2-135M in float32.

Each round runs `python -m recalign run tallrec ...` (one process, OMP_NUM_THREADS = all cores) and
`torchrun --standalone --nproc_per_node N -m recalign run tallrec ...` (N processes, cores / N threads each)
into fresh run directories, alternating (1, N, 1, N, ...) so that load from other jobs hits both alike.
Reported per round and as medians: training samples/s (shots x epochs / train seconds, the validation
scoring at the epoch end included), scoring samples/s (test samples / eval seconds), wall and CPU seconds of
the whole command (CPU: every process, imports and model loading included), the N-vs-1 ratios, and the
metric agreement (|test AUC difference|, relative difference of the training loss).

On a CPU the processes share the same cores: N processes with 1/N of the threads each do not add compute,
so a ratio near 1 (or below, from the gradient all-reduce and the duplicated model) is the expected result
on an idle machine; on a machine loaded by other jobs, N processes also get a larger share of the scheduler,
which the CPU seconds show. The point of the run is that the metrics agree. On GPUs each process has its own device (bench/gpu_throughput.py).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/scale.py [--processes 2] [--shots 32] [--valid-size 16]
        [--test-size 64] [--rounds 2] [--model smollm2-135m-instruct] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scale.json"


def run_sets(args) -> list[str]:
    sets = {"model.name": "tiny-random" if args.tiny else args.model, "model.dtype": "float32",
            "train.shots": args.shots, "train.epochs": 1, "train.seeds": 1, "samples.valid_size": args.valid_size,
            "samples.test_size": args.test_size}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def one_run(processes: int, out: Path, args, cores: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "RECALIGN_QUIET": "1",
           "OMP_NUM_THREADS": str(max(1, cores // processes))}
    env.pop("WORLD_SIZE", None)
    recalign = ["-m", "recalign", "run", "tallrec", "--out", str(out), *run_sets(args)]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # counts every waited-for descendant
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *launcher, *recalign], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    seed = metrics["per_seed"][0]
    trained = metrics["shots"] * 1
    scored = metrics["samples"]["test_scored"]  # valid scores come from the last evaluation during training
    return {"processes": processes, "wall_s": wall, "cpu_s": cpu, "train_s": metrics["seconds"]["train"],
            "eval_s": metrics["seconds"]["eval"], "train_samples_per_s": trained / metrics["seconds"]["train"],
            "score_samples_per_s": scored / metrics["seconds"]["eval"], "test_auc": metrics["test"]["auc"],
            "test_auc_ci": metrics["test"].get("auc_ci"), "valid_auc": metrics["valid"].get("auc"),
            "losses": [h["loss"] for h in seed["history"]], "steps": seed["steps"], "n_test": metrics["test"]["n"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--valid-size", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (a smoke run of this script)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    rows, loads = [], [load_average()]
    with tempfile.TemporaryDirectory(prefix="recalign-scale-") as tmp:
        for round_ in range(args.rounds):
            for processes in (1, args.processes):
                row = one_run(processes, Path(tmp) / f"r{round_}-p{processes}", args, cores)
                row["round"] = round_
                rows.append(row)
                loads.append(load_average())
                print(f"round {round_} processes {processes}: train {row['train_samples_per_s']:.2f} samples/s, "
                      f"scoring {row['score_samples_per_s']:.2f} samples/s, test AUC {row['test_auc']:.4f}",
                      file=sys.stderr)

    def median(processes: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["processes"] == processes)

    n = args.processes
    summary = {key: {"1": median(1, key), str(n): median(n, key), "ratio": median(n, key) / median(1, key)}
               for key in ("train_samples_per_s", "score_samples_per_s", "wall_s", "cpu_s")}
    pairs = [(a, b) for a in rows for b in rows if a["processes"] == 1 and b["processes"] == n
             and a["round"] == b["round"]]
    agreement = {"max_abs_test_auc_diff": max(abs(a["test_auc"] - b["test_auc"]) for a, b in pairs),
                 "max_rel_loss_diff": max(abs(x - y) / abs(x) for a, b in pairs
                                          for x, y in zip(a["losses"], b["losses"]))}
    result = {"machine": f"{cpu_name()}, {cores} cores, load average "
                         f"{min(loads):.1f}-{max(loads):.1f}",
              "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/scale.py " + " ".join(argv or sys.argv[1:]),
              "settings": {"model": "tiny-random" if args.tiny else args.model, "dtype": "float32",
                           "shots": args.shots, "epochs": 1, "valid_size": args.valid_size,
                           "test_size": args.test_size, "processes": n, "rounds": args.rounds},
              "summary": summary, "agreement": agreement, "rows": rows}
    print(f"| measure | 1 process | {n} processes | ratio |\n|---|---|---|---|")
    for key, label in (("train_samples_per_s", "LoRA training, samples/s"),
                       ("score_samples_per_s", "Yes/No scoring, samples/s"), ("wall_s", "whole run, s"),
                       ("cpu_s", "whole run, CPU s (all processes)")):
        s = summary[key]
        print(f"| {label} | {s['1']:.2f} | {s[str(n)]:.2f} | {s['ratio']:.2f} |")
    print(f"\nmax |test AUC difference| {agreement['max_abs_test_auc_diff']:.4f}; max relative loss difference "
          f"{agreement['max_rel_loss_diff']:.2e}; {result['machine']}")
    if not args.tiny:
        from recalign.io import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
