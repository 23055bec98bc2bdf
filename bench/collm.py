"""CoLLM benchmark: the seed's CoLLM table on ML-100K with SmolLM2-135M, AUC / UAUC on all, warm and cold
test cases, mean ± std over seeds, wall times.

Rows (every row scored on the SAME bounded test cases, CoLLM's CTR protocol):
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
    parser.add_argument("--step2-epochs", type=int, default=1)
    parser.add_argument("--step2-lr", type=float, default=1e-3)
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every collm run")
    parser.add_argument("--out", default="/tmp/recalign-bench-collm")
    parser.add_argument("--bootstrap", action="store_true",
                        help="also report paired-bootstrap intervals of AUC differences (first seed)")
    parser.add_argument("--results", default=str(ROOT / "results" / "collm.json"))
    return parser.parse_args()


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
    labels = {"mf": "MF", "lightgcn": "LightGCN", "sasrec": "SASRec"}
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
            extra += [f"eval.icl={str(first).lower()}", "eval.zero_cf=true"]
        else:
            extra += [f"step1.init_from={step1_dir}", "eval.step1=false"]
        m = run(f"seed {seed} collm-{cf}", "collm", out / f"collm-{cf}", base + extra)
        s = m["seconds"]
        rows[labels[cf]] = {"test": m["baselines"]["cf"]["test"], "test_full": m["baselines"]["cf"]["test_full"],
                            "seconds": {"train": s["cf"], "eval": None}}
        rows[f"CoLLM-{labels[cf]}"] = {"test": m["test"], "seconds": {"train": s["step2"], "eval": s["eval"]},
                                       "training": m["training"].get("step2")}
        if step1_dir is None:
            step1_dir = out / f"collm-{cf}"
            rows["TALLRec"] = {"test": m["baselines"]["step1"]["test"],
                               "seconds": {"train": s["step1"], "eval": None},
                               "training": m["training"].get("step1")}
            if "icl" in m["baselines"]:
                rows["ICL"] = {"test": m["baselines"]["icl"]["test"], "seconds": {"train": 0.0, "eval": None}}
            rows[f"CoLLM-{labels[cf]}, CF zeroed"] = {"test": m["ablation"]["zero_cf"]["test"],
                                                      "seconds": {"train": None, "eval": None}}
        publish(rows)
    return rows


ORDER = ["MF", "LightGCN", "SASRec", "ICL", "Soft-Prompt", "TALLRec", "CoLLM-MF", "CoLLM-LightGCN", "CoLLM-SASRec",
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
                cells.append(f"{value['mean']:.4f}")
            else:
                cells.append(f"{value['mean']:.4f} ± {value['std']:.4f}")
        train = "–" if entry["train_seconds"] is None else f"{entry['train_seconds']:.0f}"
        lines.append(f"| {name} | {entry['seeds']} | " + " | ".join(cells) + f" | {train} |")
    return "\n".join(lines)


class ReadOnlyStore:
    """A run's checkpoints, read but never written (the CF trainer resumes its finished state from them)."""

    def __init__(self, checkpoints):
        self.checkpoints, self.path = checkpoints, checkpoints.path

    def load_checkpoint(self, name: str):
        return self.checkpoints.load_checkpoint(name)

    def save_checkpoint(self, name: str, state) -> None:
        raise SystemExit(f"{self.path}: the run's CF checkpoint {name} is not finished; rerun the bench to finish it")


def run_cf_model(section: dict, data, ds, checkpoints, seed: int):
    """The run's trained CF model, read back from its finished trainer checkpoint `cf-NAME` (built as the
    run's `cf` section builds it: sequential models take max_len = history_len, objective "" = bce if the model
    has it), so its scores are exactly the run's."""
    from recalign.cf import model_class, train_cf_model

    name = section["model"]
    cls = model_class(name)
    params = dict(section["params"])
    if cls.kind == "sequential":
        params.setdefault("max_len", data.history_len)
    train = dict(section["train"])
    train["objective"] = train.get("objective") or ("bce" if "bce" in cls.objectives else "")
    return train_cf_model(name, data.train_all, {"model": params, "train": train}, catalog=ds,
                          valid=None, run=ReadOnlyStore(checkpoints), checkpoint=f"cf-{name}", seed=seed)


def paired_bootstrap(args, seed: int = 0, draws: int = 2000) -> dict:
    """95% intervals of AUC differences on the warm and cold test cases of one seed (cases resampled with
    replacement within each group; all rows scored on the same cases, so the differences are paired)."""
    import numpy as np
    import yaml

    from recalign.cf import score_pairs
    from recalign.data import load_dataset
    from recalign.eval import auc
    from recalign.io import Checkpoints
    from recalign.tasks.ctr import collm_protocol
    from recalign.tasks.next_item import Cases

    out = Path(args.out) / f"seed-{seed}" / f"collm-{args.cf[0]}"
    metrics = json.loads((out / "metrics.json").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())  # the run's resolved config
    data_cfg = config["data"]
    ds = load_dataset("ml-100k", fmt=data_cfg["format"], like_threshold=data_cfg["like_threshold"],
                      k_core_users=data_cfg["k_core_users"], k_core_items=data_cfg["k_core_items"],
                      domain=data_cfg["domain"])
    data = collm_protocol(ds, config["data_protocol"], seed)
    checkpoints = Checkpoints(out / "checkpoints")

    def saved(name):
        state = checkpoints.load_checkpoint(f"eval-{name}")
        if state is None:
            raise SystemExit(f"{out}: no checkpoint eval-{name} (scores of the run's {name} set)")
        return np.asarray(state["scores"])

    scores = {"CoLLM": saved("test"), "TALLRec": saved("step1-test"), "zeroed": saved("zero-cf-test")}
    cf = run_cf_model(config["cf"], data, ds, checkpoints, seed)
    scores["CF"] = score_pairs(cf, Cases.from_samples(data.test))
    check = auc(data.test["label"][data.test["warm"]], scores["CF"][data.test["warm"].to_numpy()])
    expected = metrics["baselines"]["cf"]["test"]["auc_warm"]
    expected = float("nan") if expected is None else expected  # metrics.json writes NaN as null
    assert (math.isnan(check) and math.isnan(expected)) or abs(check - expected) < 1e-6, "CF model not reproduced"
    rng = np.random.default_rng(0)
    labels = data.test["label"].to_numpy(bool)
    result = {}
    for group, mask in (("warm", data.test["warm"].to_numpy()), ("cold", ~data.test["warm"].to_numpy())):
        index = np.flatnonzero(mask)
        for a, b in (("CoLLM", "TALLRec"), ("CoLLM", "CF"), ("CoLLM", "zeroed")):
            deltas = []
            for _ in range(draws):
                pick = rng.choice(index, size=len(index), replace=True)
                deltas.append(auc(labels[pick], scores[a][pick]) - auc(labels[pick], scores[b][pick]))
            point = auc(labels[index], scores[a][index]) - auc(labels[index], scores[b][index])
            low, high = np.nanpercentile(deltas, [2.5, 97.5])
            result[f"{a} - {b} ({group})"] = {"delta_auc": float(point), "ci95": [float(low), float(high)]}
    return result


def main() -> None:
    args = parse()
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
    if args.bootstrap:
        intervals = paired_bootstrap(args, args.seeds[0])
        saved = json.loads(Path(args.results).read_text())
        saved["paired_bootstrap"] = intervals
        atomic_write_json(Path(args.results), saved)
        for name, value in intervals.items():
            print(f"{name}: delta AUC {value['delta_auc']:+.4f}, 95% CI [{value['ci95'][0]:+.4f}, "
                  f"{value['ci95'][1]:+.4f}]")
    print(f"CoLLM table, ML-100K, {args.model}, {args.train} training samples, test <= {args.test_warm} warm + "
          f"{args.test_cold} cold cases, seeds {args.seeds}, wall {time.perf_counter() - started:.0f}s")
    print(markdown(aggregate(per_seed)))


if __name__ == "__main__":
    main()
