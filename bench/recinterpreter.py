"""RecInterpreter on ML-100K with SmolLM2-135M: can the frozen LLM read a frozen sequential recommender's hidden
states through a trained projector? One `recalign run recinterpreter` per (encoder, seed), resumable; prints
the tables and writes JSON (every metric, its 95% bootstrap interval over the test windows, the encoder's
valid NDCG@10).

    python bench/recinterpreter.py --encoders sasrec gru4rec caser --seeds 0 --recovery sasrec \\
        --train-size 256 --test-size 50 --encoder-minutes 3 --set model.dtype=float32

The residual probe runs for every (encoder, seed); the recovery probe (long answers, costly on a CPU) for the
encoders named by --recovery, first seed only. Test windows are the same for every run (samples.subset_seed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from recalign.io import atomic_write_json  # noqa: E402
from recalign.runner import run_method  # noqa: E402

VARIANTS = [("", "projected hidden states"), ("_shuffled", "another user's window"),
            ("_random", "random vectors"), ("_text", "titles as text (zero-shot)"), ("_pop", "popularity")]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["sasrec", "gru4rec", "caser"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recovery", nargs="*", default=["sasrec"], help="encoders that also run the recovery probe")
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--valid-size", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--encoder-minutes", type=float, default=3.0, help="0 = no time cap")
    parser.add_argument("--encoder-epochs", nargs="*", default=[], metavar="ENCODER=EPOCHS",
                        help="fixed encoder epochs (e.g. sasrec=8): unlike --encoder-minutes, independent of the "
                             "machine's load")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="runs/bench-recinterpreter")
    parser.add_argument("--json", default="bench/results/recinterpreter.json")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more --set overrides for every run")
    return parser.parse_args()


def run_one(args, encoder: str, seed: int, probes: list[str]) -> dict:
    out = Path(args.out) / f"{encoder}-seed{seed}"
    sets = [f"model.name={args.model}", f"encoder.model={encoder}", f"seed={seed}",
            f"probes=[{', '.join(probes)}]", f"samples.train_size={args.train_size}",
            f"samples.valid_size={args.valid_size}", f"samples.test_size={args.test_size}",
            f"train.epochs={args.epochs}", f"encoder.train.max_minutes={args.encoder_minutes}", *args.extra]
    epochs = dict(pair.split("=", 1) for pair in args.encoder_epochs)
    if encoder in epochs:
        sets.append(f"encoder.train.epochs={int(epochs[encoder])}")
    load, started = os.getloadavg()[0], time.perf_counter()
    metrics = run_method("recinterpreter", "ml-100k", out, sets=sets, resume=True)
    wall = {"wall_s": time.perf_counter() - started, "load_before": load, "load_after": os.getloadavg()[0]}
    saved = json.loads((out / "metrics.json").read_text())
    return {"encoder": encoder, "seed": seed, "probes": probes, "out": str(out), "test": metrics["test"],
            "intervals": saved.get("intervals", {}), "samples": saved.get("samples", {}),
            "encoder_valid_ndcg@10": saved.get("encoder", {}).get("valid_ndcg@10"),
            "encoder_epochs": saved.get("encoder", {}).get("summary", {}).get("epochs"),
            "seconds": saved.get("seconds", {}), "this_call": wall, "precision": saved.get("precision"), "recovery_distribution": saved.get("recovery_distribution", {}),
            "training": {p: {k: v for k, v in t.items() if k != "history"} for p, t in saved.get("training", {}).items()}}


def cell(row: dict, name: str) -> str:
    value = row["test"].get(name)
    if value is None:
        return "–"
    interval = row["intervals"].get(name)
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"


def tables(rows: list[dict]) -> str:
    lines = []
    residual = [r for r in rows if "residual" in r["probes"]]
    if residual:
        n = residual[0]["samples"].get("test_windows")
        lines += [f"Residual probe ({n} test windows; 95% intervals: Wilson for top-k, bootstrap for the NLL)", "",
                  "| encoder | seed | encoder valid NDCG@10 | variant | top-1 | top-5 | answer NLL |",
                  "|---|---|---|---|---|---|---|"]
        for r in residual:
            for suffix, label in VARIANTS:
                if f"residual_top1{suffix}" not in r["test"]:
                    continue
                best = r["encoder_valid_ndcg@10"] or float("nan")
                lines.append(f"| {r['encoder']} | {r['seed']} | {best:.4f} | {label} | {cell(r, 'residual_top1' + suffix)} "
                             f"| {cell(r, 'residual_top5' + suffix)} | {cell(r, 'residual_nll' + suffix)} |")
            lines.append(f"| {r['encoder']} | {r['seed']} | | NLL(shuffled) − NLL(own) | | | "
                         f"{cell(r, 'residual_nll_gap_shuffled')} |")
        lines.append("")
    recovery = [r for r in rows if "recovery" in r["probes"]]
    if recovery:
        n = recovery[0]["samples"].get("test_windows")
        length = len(recovery[0]["recovery_distribution"].get("recovery_dist", [0] * 11)) - 1
        lines += [f"Recovery probe ({n} test windows; titles recovered of L = {length}; 95% bootstrap intervals)", "",
                  "| encoder | seed | variant | mean recovered | precision | answer NLL |", "|---|---|---|---|---|---|"]
        for r in recovery:
            for suffix, label in VARIANTS:
                if f"recovery_mean{suffix}" in r["test"]:
                    lines.append(f"| {r['encoder']} | {r['seed']} | {label} | {cell(r, 'recovery_mean' + suffix)} | "
                                 f"{cell(r, 'recovery_precision' + suffix)} | {cell(r, 'recovery_nll' + suffix)} |")
            lines.append(f"| {r['encoder']} | {r['seed']} | NLL(shuffled) − NLL(own) | | | "
                         f"{cell(r, 'recovery_nll_gap_shuffled')} |")
    return "\n".join(lines)


def compact(rows: list[dict]) -> str:
    """One line per (encoder, seed) of the residual probe: does the projected state beat its controls?"""
    lines = ["| encoder | seed | encoder epochs | encoder valid NDCG@10 | top-1 own | top-1 random | top-1 shuffled "
             "| NLL(shuffled) − NLL(own) | NLL(random) − NLL(own) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "residual_top1" in r["test"]:
            lines.append(f"| {r['encoder']} | {r['seed']} | {r['encoder_epochs']} | {r['encoder_valid_ndcg@10']:.4f} "
                         f"| {cell(r, 'residual_top1')} | {cell(r, 'residual_top1_random')} "
                         f"| {cell(r, 'residual_top1_shuffled')} | {cell(r, 'residual_nll_gap_shuffled')} "
                         f"| {cell(r, 'residual_nll_gap_random')} |")
    return "\n".join(lines)


def distribution(rows: list[dict]) -> str:
    """The recovery probe's share of test windows recovering k titles, k = 0..L."""
    lines = []
    for r in rows:
        dists = r.get("recovery_distribution", {})
        if not dists:
            continue
        length = len(next(iter(dists.values()))) - 1
        lines += [f"| {r['encoder']} seed {r['seed']}: share of windows recovering k titles | "
                  + " | ".join(str(k) for k in range(length + 1)) + " |", "|---" * (length + 2) + "|"]
        for key, values in dists.items():
            label = dict(VARIANTS).get(key.removeprefix("recovery_dist"), key)
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    platform.processor())
    except OSError:
        return platform.processor()


def main() -> None:
    args = parse()
    rows = []
    for seed in args.seeds:
        for encoder in args.encoders:
            probes = (["recovery", "residual"] if encoder in args.recovery and seed == args.seeds[0] else ["residual"])
            rows.append(run_one(args, encoder, seed, probes))
            print(tables(rows[-1:]), flush=True)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.json), {"machine": cpu_model(), "args": vars(args), "runs": rows})  # after every run
    print("\n" + tables(rows) + "\n\n" + compact(rows) + "\n\n" + distribution(rows))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
