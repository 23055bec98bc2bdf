"""CoLLM benchmark: the seed's CoLLM table on ML-100K with SmolLM2-135M, AUC / UAUC on all, warm and cold
test cases, mean ± std over seeds, wall times.

Rows (every row scored on the SAME bounded test cases, CoLLM's CTR protocol):
  item like-rate         counting, no model: the item's share of likes among all training samples
  MF, LightGCN, SASRec   the CF models alone in CTR mode (trained on all training samples, BCE)
  ICL                    the base LLM zero-shot on CoLLM's text prompt
  Soft-Prompt            learned prompt vectors, frozen LLM (`softprompt` method)
  TALLRec                CoLLM's step 1 alone: LoRA on the text prompt (BCE), no IDs
  CoLLM-MF/-LightGCN/-SASRec   step 2 (CIE only) on top of that step-1 adapter
  CoLLM-MF, CF zeroed    ablation: the trained CoLLM-MF with zero CF embeddings at test time

One `collm` run per seed trains MF + step 1 + step 2 and scores the MF, ICL (first seed), TALLRec, CoLLM and
zeroed-CF rows; the LightGCN / SASRec runs reuse that run's step-1 adapter (`step1.init_from`). Runs go to
OUT/seed-N/<name>/ and are resumed when the command is run again.

    nice -n 10 .venv/bin/python bench/collm.py --seeds 0 [--train 256 --valid 48 --test-warm 1000 --test-cold 1000 --per-user 100]
        [--cf mf] [--no-softprompt] [--no-ablation] [--set step1.epochs=3 ...]

With one seed, each cell carries its 95% bootstrap interval; every CoLLM run's own `paired` (CoLLM minus the CF
model, step 1, ICL, zeroed CF on the same samples, with paired intervals) is printed and kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RECALIGN_QUIET", "1")

from recalign.runner import run_method  # noqa: E402
from recalign.io import atomic_write_json, atomic_write_text  # noqa: E402

METRICS = ["auc", "uauc", "auc_warm", "uauc_warm", "auc_cold", "uauc_cold"]
ROOT = Path(__file__).resolve().parent


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--train", type=int, default=256, help="few-shot training samples for the LLM steps")
    parser.add_argument("--valid", type=int, default=48)
    parser.add_argument("--test-warm", type=int, default=1000)
    parser.add_argument("--test-cold", type=int, default=1000)
    parser.add_argument("--per-user", type=int, default=100, help="at most this many test cases per user")
    parser.add_argument("--cf", nargs="+", default=["mf", "lightgcn", "sasrec"], choices=["mf", "lightgcn", "sasrec"])
    parser.add_argument("--no-softprompt", action="store_true")
    parser.add_argument("--full-seeds", type=int, default=None,
                        help="only the first K seeds run every row; later seeds run the core rows (MF, TALLRec, "
                             "CoLLM-MF, zeroed CF) only")
    parser.add_argument("--no-ablation", action="store_true",
                        help="skip the ICL and zeroed-CF rows (two of the scoring passes over the test cases)")
    parser.add_argument("--step2-epochs", type=int, default=1)
    parser.add_argument("--step2-lr", type=float, default=1e-3)
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every collm run")
    parser.add_argument("--out", default="/tmp/recalign-bench-collm")
    parser.add_argument("--results", default=None, help="default: bench/results/collm.json (with --counting-of: "
                                                               "only printed unless given)")
    parser.add_argument("--counting-of", metavar="RUN", default=None,
                        help="instead of the bench: the item like-rate row on a finished CoLLM run's test cases, and "
                             "each of its rows minus it, paired")
    args = parser.parse_args()
    if args.results is None and not args.counting_of:
        args.results = str(ROOT / "results" / "collm.json")
    return args


def protocol_sets(args) -> list[str]:
    return [f"model.name={args.model}", f"data_protocol.max_train={args.train}",
            f"data_protocol.max_valid={args.valid}", f"data_protocol.max_test_warm={args.test_warm}",
            f"data_protocol.max_test_cold={args.test_cold}", f"data_protocol.max_per_user={args.per_user}"]


def run(name: str, method: str, out: Path, sets: list[str]) -> dict:
    """Run (or resume) one method; a finished run directory is read back as it is."""
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    metrics = run_method(method, "ml-100k", out, sets=sets, resume=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name} done ({time.perf_counter() - started:.0f}s this call, "
          f"test auc {metrics['test']['auc']:.4f})", file=sys.stderr, flush=True)
    return metrics


def rows_for_seed(args, seed: int, first: bool, publish, core_only: bool = False) -> dict[str, dict]:
    """{row name: {"test": metrics, "seconds": {...}}} for one seed; `publish(rows)` after every run."""
    out = Path(args.out) / f"seed-{seed}"
    base = protocol_sets(args) + [f"seed={seed}", f"step2.epochs={args.step2_epochs}", f"step2.lr={args.step2_lr}",
                                  *args.set]
    rows: dict[str, dict] = {}
    labels = LABELS
    step1_dir = None
    plan = [("collm", cf) for cf in (args.cf[:1] if core_only else args.cf)]
    if not args.no_softprompt and not core_only:
        plan.insert(1, ("softprompt", None))  # right after the first CoLLM run (the core of the table)
    for method, cf in plan:
        if method == "softprompt":
            m = run(f"seed {seed} softprompt", "softprompt", out / "softprompt", protocol_sets(args) + [f"seed={seed}"])
            rows["Soft-Prompt"] = {"test": m["test"], "seconds": dict(m["seconds"]), "training": m.get("training")}
            publish(rows)
            continue
        extra = [f"cf.model={cf}"]
        if step1_dir is None:
            ablation = not args.no_ablation
            extra += [f"eval.icl={str(first and ablation).lower()}", f"eval.zero_cf={str(ablation).lower()}"]
        else:
            extra += [f"step1.init_from={step1_dir}", "eval.step1=false"]
        m = run(f"seed {seed} collm-{cf}", "collm", out / f"collm-{cf}", base + extra)
        s = m["seconds"]
        rows[labels[cf]] = {"test": m["baselines"]["cf"]["test"], "test_full": m["baselines"]["cf"]["test_full"],
                            "seconds": {"train": s["cf"], "eval": None}}
        rows[f"CoLLM-{labels[cf]}"] = {"test": m["test"], "seconds": {"train": s["step2"], "eval": s["eval"]},
                                       "training": m["training"].get("step2"), "paired": m.get("paired", {})}
        if step1_dir is None:
            step1_dir = out / f"collm-{cf}"
            if "item_like_rate" in m["baselines"]:
                rows["item like-rate"] = {"test": m["baselines"]["item_like_rate"]["test"],
                                          "seconds": {"train": 0.0, "eval": None}}
            rows["TALLRec"] = {"test": m["baselines"]["step1"]["test"],
                               "seconds": {"train": s["step1"], "eval": None},
                               "training": m["training"].get("step1")}
            if "icl" in m["baselines"]:
                rows["ICL"] = {"test": m["baselines"]["icl"]["test"], "seconds": {"train": 0.0, "eval": None}}
            if "zero_cf" in m["ablation"]:
                rows[f"CoLLM-{labels[cf]}, CF zeroed"] = {"test": m["ablation"]["zero_cf"]["test"],
                                                          "seconds": {"train": None, "eval": None}}
        publish(rows)
    return rows


LABELS = {"mf": "MF", "lightgcn": "LightGCN", "sasrec": "SASRec"}
ORDER = ["item like-rate", "MF", "LightGCN", "SASRec", "ICL", "Soft-Prompt", "TALLRec", "CoLLM-MF", "CoLLM-LightGCN", "CoLLM-SASRec",
         "CoLLM-MF, CF zeroed"]


def aggregate(per_seed: dict[int, dict]) -> dict[str, dict]:
    table = {}
    names = [n for n in ORDER if any(n in rows for rows in per_seed.values())]
    for name in names:
        runs = [rows[name] for rows in per_seed.values() if name in rows]
        entry = {"seeds": len(runs)}
        for metric in METRICS + ["n_warm", "n_cold"]:
            values = [r["test"].get(metric) for r in runs if r["test"].get(metric) is not None]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            if values:
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
                entry[metric] = {"mean": mean, "std": std}
                if len(runs) == 1 and runs[0]["test"].get(f"{metric}_ci"):  # one seed: its bootstrap interval
                    entry[metric]["ci"] = runs[0]["test"][f"{metric}_ci"]
        train = [r["seconds"]["train"] for r in runs if r["seconds"].get("train") is not None]
        entry["train_seconds"] = sum(train) / len(train) if train else None
        table[name] = entry
    return table


def markdown(table: dict[str, dict]) -> str:
    head = "| method | seeds | " + " | ".join(METRICS) + " | train s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for name, entry in table.items():
        cells = []
        for metric in METRICS:
            value = entry.get(metric)
            if value is None:
                cells.append("–")
            elif value["std"] is None:
                ci = value.get("ci")
                cells.append(f"{value['mean']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            else:
                cells.append(f"{value['mean']:.4f} ± {value['std']:.4f}")
        train = "–" if entry["train_seconds"] is None else f"{entry['train_seconds']:.0f}"
        lines.append(f"| {name} | {entry['seeds']} | " + " | ".join(cells) + f" | {train} |")
    return "\n".join(lines)


def paired_markdown(paired: dict) -> str:
    """CoLLM minus each row on the same test samples (the run's own `paired`: differences with paired 95%
    bootstrap intervals; cases resampled for AUC, users for UAUC)."""
    slices = ["auc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold"]
    lines = ["| CoLLM − | " + " | ".join(slices) + " |", "|---|" + "---|" * len(slices)]
    for name, difference in paired.items():
        cells = []
        for key in slices:
            d = difference.get(key)
            ci = d and d["ci"]
            cells.append("–" if d is None else f"{d['difference']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""))
        lines.append(f"| {name.removeprefix('collm-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def counting_of(run: Path, results: Path | None) -> None:
    """`--counting-of RUN`: the item like-rate counting baseline on a finished CoLLM run's test cases, each of the
    run's rows (`predictions-test.json`) minus it, paired (for runs made before `collm` reported it itself)."""
    import numpy as np

    from recalign import config as cfg_mod
    from recalign.data import load_dataset
    from recalign.tasks.ctr import collm_protocol, counting_baselines, counting_rows, paired_with_counting

    if not (run / "predictions-test.json").is_file():
        raise SystemExit(f"{run}: no predictions-test.json (not a finished CoLLM run)")
    config = cfg_mod.load_yaml(run / "config.yaml")
    predictions = json.loads((run / "predictions-test.json").read_text())
    dataset = json.loads((run / "metrics.json").read_text())["dataset"]
    ds = load_dataset(dataset, fmt=config["data"].get("format"), like_threshold=config["data"].get("like_threshold"),
                      k_core_users=config["data"].get("k_core_users", 0), k_core_items=config["data"].get("k_core_items", 0))
    data = collm_protocol(ds, config["data_protocol"], int(config["seed"]))
    if data.test["user"].tolist() != predictions["user"] or data.test["item"].tolist() != predictions["item"]:
        raise SystemExit(f"{run}: its predictions are not this protocol's test cases")
    floor = {"item_like_rate": counting_baselines(data.train_all, data.test)["item_like_rate"]}
    paired = {}
    for row, scores in predictions["scores"].items():
        if row != "item_like_rate":  # the floor itself
            paired.update(paired_with_counting(row, data.test, np.asarray(scores), floor))
    out = {"run": str(run), "item_like_rate": counting_rows(floor, data.test)["item_like_rate"]["test"],
           "paired": paired}
    if results is not None:
        atomic_write_json(results, out)
    print(markdown(aggregate({0: {"item like-rate": {"test": out["item_like_rate"], "seconds": {"train": 0.0}}}})))
    print(paired_markdown(out["paired"]))


def main() -> None:
    args = parse()
    if args.counting_of:
        counting_of(Path(args.counting_of), Path(args.results) if args.results else None)
        return
    started = time.perf_counter()
    per_seed: dict[int, dict] = {}

    def publish(rows=None, seed=None) -> None:
        if rows is not None:
            per_seed[seed] = rows
        table = aggregate(per_seed)
        result = {"bench": "collm", "dataset": "ml-100k", "model": args.model, "args": vars(args),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version()},
                  "wall_seconds": time.perf_counter() - started, "table": table, "per_seed": per_seed}
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.results), result)
        atomic_write_text(Path(args.results).with_suffix(".md"), markdown(table) + "\n")

    for index, seed in enumerate(args.seeds):
        core_only = args.full_seeds is not None and index >= args.full_seeds
        rows_for_seed(args, seed, index == 0, lambda rows, seed=seed: publish(rows, seed), core_only)
    print(f"CoLLM table, ML-100K, {args.model}, {args.train} training samples, test <= {args.test_warm} warm + "
          f"{args.test_cold} cold cases, seeds {args.seeds}, wall {time.perf_counter() - started:.0f}s")
    print(markdown(aggregate(per_seed)))
    for seed, rows in per_seed.items():
        for cf in args.cf:
            if rows.get(f"CoLLM-{LABELS[cf]}", {}).get("paired"):
                print(f"\nCoLLM-{LABELS[cf]} minus each row, seed {seed}, paired on the same test samples [95%]")
                print(paired_markdown(rows[f"CoLLM-{LABELS[cf]}"]["paired"]))


if __name__ == "__main__":
    main()
