"""Benchmark: ICL vs TALLRec at N = 16 / 64 / 256 shots (mean ± std over seeds) on ML-100K with SmolLM2-135M,
next to MF trained as a CTR model (BCE) on the same N samples and on the whole training period, all scored on
the same test subset (temporal split by target time, warm/cold reported).

Runs go through `recalign run` (run directories under --work, resumable: rerun the same command to
continue after an interruption). Writes bench/results/tallrec.json and prints the table.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/tallrec.py [--shots 16,64,256] [--seeds 3]
        [--test-size 2000] [--valid-size 128] [--work runs/bench-tallrec] [--set key=value ...]

Subcommands: `score` (per-sample test scores of ICL or a run's adapter, sharded, resumable), `baselines` (the
same for the counting baselines, no LLM), `pair` (metrics and paired differences of scored models), `valid` (best valid AUC of finished runs, paired with the first: the
recipe study's decision, no test score read).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "tallrec.json"


def run(method: str, out: Path, sets: list[str]) -> dict:
    from recalign.runner import run_method

    started = time.perf_counter()
    metrics = run_method(method, "ml-100k", out, sets=sets, resume=True)
    metrics.setdefault("bench_wall_seconds", time.perf_counter() - started)
    return metrics


def mf_ctr(shots: list[int], seeds: int, test_size: int, valid_size: int) -> dict:
    """MF (BCE) on the same N-shot samples and on all training samples, scored on the same test subset."""
    from recalign.cf import score_pairs, train_cf_model
    from recalign.data import few_shot, load_dataset
    from recalign.tasks.ctr import TALLREC_SAMPLES, ctr_report, tallrec_protocol
    from recalign.tasks.next_item import Cases

    ds = load_dataset("ml-100k")
    data = tallrec_protocol(ds, {**TALLREC_SAMPLES, "test_size": test_size, "valid_size": valid_size})
    valid = Cases.from_samples(data.valid_full)  # the whole valid period for the CF model's early stopping
    config = {"train": {"objective": "bce", "valid_metric": "auc"}}
    out = {}
    for n in [*shots, 0]:
        aucs, started = [], time.perf_counter()
        for seed in range(seeds if n else 1):
            train = few_shot(data.train, n or None, seed)
            model = train_cf_model("mf", train, config, catalog=ds, valid=valid, seed=seed)
            scores = score_pairs(model, Cases.from_samples(data.test))
            aucs.append(ctr_report(data.test, scores))
        out[str(n or "all")] = {"auc": [a["auc"] for a in aucs], "uauc": [a["uauc"] for a in aucs],
                                "auc_cold": [a.get("auc_cold") for a in aucs],
                                "auc_warm": [a.get("auc_warm") for a in aucs],
                                "seconds": time.perf_counter() - started}
    return out


# the TALLRec settings the bench leaves to the registered experiment of each shot count (train.shots, train.seeds
# and the sample sizes come from the bench's own arguments)
BENCH_KEYS = ("train.shots", "train.seeds", "samples.")
FALLBACK_SCHEDULE = {"train.epochs": 3}  # a shot count without a registered `tallrec-N` experiment


def schedules(shots: list[int]) -> dict[int, dict]:
    """Per shot count N, the training schedule of the registered full-profile experiment `tallrec-N`
    (epochs, eval_every: fewer shots get more epochs), or FALLBACK_SCHEDULE when there is none."""
    from recalign.methods import all_experiments

    registered = {e.name: e for e in all_experiments() if e.method == "tallrec"}
    out = {}
    for n in shots:
        experiment = registered.get(f"tallrec-{n}")
        if experiment is None:
            out[n] = dict(FALLBACK_SCHEDULE)
            continue
        out[n] = {k: v for k, v in experiment.full.items() if not k.startswith(BENCH_KEYS)}
    return out


def paired_with_icl(work: Path, shots: list[int], seeds: int) -> dict:
    """Per shot count and seed: TALLRec − ICL on the same test samples (paired AUC/UAUC intervals), from the
    runs' per-sample scores; runs without them (made before scores were written) are left out."""
    import json

    from recalign.eval.intervals import paired_predictions

    icl = work / "icl" / "predictions.json"
    if not icl.exists():
        return {}
    icl_scores = json.loads(icl.read_text())
    out = {}
    for n in shots:
        for seed in range(seeds):
            path = work / f"tallrec-{n}" / f"predictions-seed{seed}-test.json"
            if path.exists():
                out[f"{n}/{seed}"] = paired_predictions(json.loads(path.read_text()), icl_scores)
    return out


def span(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[–]"


def fmt(values) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="16,64,256")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--valid-size", type=int, default=128)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-tallrec"))  # /runs/ is git-ignored
    parser.add_argument("--no-cf", action="store_true")
    parser.add_argument("--set", dest="sets", action="append", default=[], 
                        help="extra config for the TALLRec runs (model.* keys, e.g. model.dtype: for ICL too)")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("RECALIGN_THREADS", "2")))
    os.environ.setdefault("RECALIGN_QUIET", "1")
    shots = [int(s) for s in args.shots.split(",") if s]
    schedule = schedules(shots)  # + the method defaults: batch 4, lr 1e-3, patience 3
    work = Path(args.work)
    common = [f"samples.test_size={args.test_size}", f"samples.valid_size={args.valid_size}"]
    common += [s for s in args.sets if s.startswith("model.")]  # model settings apply to ICL too
    from recalign.io import atomic_write_json

    def runs_of(results: dict) -> dict:
        return {name: {"test": m["test"], "valid": m["valid"], "seconds": m["seconds"],
                       "per_seed": [{k: v for k, v in row.items() if k != "history"} for row in m.get("per_seed", [])]}
                for name, m in results.items()}

    started = time.perf_counter()
    def finished(name: str, metrics: dict) -> None:
        results[name] = metrics
        print(f"{name}: test AUC {metrics['test']['auc']:.4f}", flush=True)
        # what is finished so far, in case a time limit (a lent GPU's) stops the bench before its table
        atomic_write_json(Path(args.results), {"partial": True, "args": vars(args), "runs": runs_of(results)})

    results = {}
    finished("icl", run("icl", work / "icl", common))
    for n in shots:
        sets = common + [f"train.shots={n}", f"train.seeds={args.seeds}"] + [f"{k}={v}" for k, v in schedule[n].items()]
        sets += [s for s in args.sets if not s.startswith("model.")]
        finished(f"tallrec-{n}", run("tallrec", work / f"tallrec-{n}", sets))
    cf = {} if args.no_cf else mf_ctr(shots, args.seeds, args.test_size, args.valid_size)
    wall = time.perf_counter() - started

    def seeds_of(name, key="auc"):
        return [r["test"][key] for r in results[name].get("per_seed", [])] or [results[name]["test"][key]]

    header = "| model | " + " | ".join(f"N = {n}" for n in shots) + " |"
    lines = [header, "|---|" + "---|" * len(shots)]
    icl = fmt([results["icl"]["test"]["auc"]])
    lines.append(f"| ICL (zero-shot, no tuning) | " + " | ".join(icl for _ in shots) + " |")
    lines.append("| TALLRec (LoRA) | " + " | ".join(fmt(seeds_of(f"tallrec-{n}")) for n in shots) + " |")
    if cf:
        lines.append("| MF (BCE) on the same N samples | " + " | ".join(fmt(cf[str(n)]["auc"]) for n in shots) + " |")
        lines.append(f"| MF (BCE) on all {len(shots) and 'training'} samples | "
                     + " | ".join(fmt(cf["all"]["auc"]) for _ in shots) + " |")
    detail = ["| N | TALLRec UAUC | TALLRec AUC warm | TALLRec AUC cold | train s (all seeds) | eval s |",
              "|---|---|---|---|---|---|"]
    for n in shots:
        r = results[f"tallrec-{n}"]
        detail.append(f"| {n} | {fmt(seeds_of(f'tallrec-{n}', 'uauc'))} | {fmt(seeds_of(f'tallrec-{n}', 'auc_warm'))} | "
                      f"{fmt(seeds_of(f'tallrec-{n}', 'auc_cold'))} | {r['seconds']['train']:.0f} | "
                      f"{r['seconds']['eval']:.0f} |")
    paired = paired_with_icl(work, shots, args.seeds)
    intervals = ["| N | seed | TALLRec test AUC [95%] | TALLRec − ICL, paired ΔAUC [95%] | ΔUAUC [95%] |",
                 "|---|---|---|---|---|"]
    for n in shots:
        for row in results[f"tallrec-{n}"].get("per_seed", []):
            d = paired.get(f"{n}/{row['seed']}")
            ci = row["test"].get("auc_ci") or [float("nan")] * 2
            intervals.append(f"| {n} | {row['seed']} | {row['test']['auc']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                             + (f"{d['auc']['difference']:+.4f} {span(d['auc']['ci'])} | "
                                f"{d['uauc']['difference']:+.4f} {span(d['uauc']['ci'])} |" if d else "– | – |"))
    print("\nTest AUC (mean ± std over seeds)\n" + "\n".join(lines) + "\n\n" + "\n".join(detail)
          + "\n\n" + "\n".join(intervals))
    print(f"\nwall time {wall / 60:.1f} min (runs finished earlier and resumed count only their reading)")
    atomic_write_json(Path(args.results), {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "args": vars(args), "schedule": {str(n): schedule[n] for n in shots},
        "wall_seconds": wall,
        "runs": runs_of(results),
        "mf_ctr": cf, "table": lines, "detail": detail, "intervals": intervals, "paired_with_icl": paired,
    })
    print(f"wrote {args.results}")


ORDER_SEED = 19


def score_test(argv: list[str]) -> None:
    """`bench/tallrec.py score`: per-sample test scores of ICL (no adapter) or of a finished TALLRec run's
    adapter (`--run DIR`: its config.yaml and checkpoints/adapter-seed<S>), on the test draw of `--test-size`
    (the same samples as every run with that size), in shards (`--shard k/K`) so several single-thread
    processes share a loaded CPU. Samples are scored in a fixed random order (ORDER_SEED; shard k takes every
    K-th of it), written every `--every` samples (atomically) and resumed from the file: whatever an
    interrupted shard scored is a random subset of the test draw, the same subset for every model scored
    with the same shards, so rows stay paired."""
    import json

    import torch

    parser = argparse.ArgumentParser(prog="bench/tallrec.py score")
    parser.add_argument("--run", default=None, help="a TALLRec run directory (default: ICL, the base model)")
    parser.add_argument("--seed", type=int, default=0, help="which seed's adapter of --run")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--shard", default="1/1", help="k/K: the k-th of K contiguous parts of the test draw")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", required=True, help="the predictions JSON to write (resumed when it exists)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("RECALIGN_THREADS", "1")))
    from recalign import config as cfg_mod
    from recalign.data import load_dataset
    from recalign.io import atomic_write_json
    from recalign.llm import Backbone, Prompter
    from recalign.llm.steps import lora_step
    from recalign.methods import get_method
    from recalign.tasks.ctr import tallrec_protocol
    from recalign.tasks.text import frame_fields

    config = (cfg_mod.load_yaml(Path(args.run) / "config.yaml") if args.run
              else {**get_method("tallrec").defaults, "data": {}})
    ds = load_dataset("ml-100k")
    test = tallrec_protocol(ds, {**config["samples"], "test_size": args.test_size}).test
    k, parts = (int(x) for x in args.shard.split("/"))
    rows = np.random.default_rng(ORDER_SEED).permutation(len(test))[k - 1::parts]
    frame = test.iloc[rows]
    backbone = Backbone.from_config(config["model"])
    if args.run:
        adapter = Path(args.run) / "checkpoints" / f"adapter-seed{args.seed}"
        lora_step(None, backbone, [], config["lora"], config["train"], args.seed, "score", adapter, init_from=adapter)
    prompt = config["prompt"]
    prompter = Prompter(prompt, backbone.tokenizer, prompt["wrapper"], prompt["system"], prompt["max_tokens"],
                        backbone.count_tokens)  # as TALLRec renders its prompts
    prompts = prompter.render_all(frame_fields(frame, ds.titles(), config["data"].get("domain") or ds.domain))
    out = Path(args.out)
    scores = json.loads(out.read_text())["score"] if out.exists() else []
    record = {"user": frame["user"].tolist(), "item": frame["item"].tolist(),
              "label": frame["label"].astype(int).tolist(), "rows": rows.tolist(),
              "test_size": args.test_size, "run": args.run, "score": scores}
    while len(scores) < len(prompts):
        batch = prompts[len(scores):len(scores) + args.every]
        scores += backbone.score_yes_no(batch, prompt["yes"], prompt["no"]).tolist()
        atomic_write_json(out, {**record, "score": scores})
        print(f"{out.name}: {len(scores)}/{len(prompts)}", flush=True)


def score_baselines(argv: list[str]) -> None:
    """`bench/tallrec.py baselines --out-dir DIR`: `score`-format files (every row of the test draw) of the
    counting baselines (`recalign.tasks.ctr.counting_baselines`: history like-ratio, item like-rate from the
    training period, both), so `pair` can set them beside the LLM rows."""
    from recalign.data import load_dataset
    from recalign.io import atomic_write_json
    from recalign.tasks.ctr import TALLREC_SAMPLES, counting_baselines, tallrec_protocol

    parser = argparse.ArgumentParser(prog="bench/tallrec.py baselines")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    data = tallrec_protocol(load_dataset("ml-100k"), {**TALLREC_SAMPLES, "test_size": args.test_size})
    test = data.test
    for name, scores in counting_baselines(data.train, test).items():
        path = Path(args.out_dir) / f"scores-{name}.json"
        atomic_write_json(path, {"user": test["user"].tolist(), "item": test["item"].tolist(),
                                 "label": test["label"].astype(int).tolist(), "rows": list(range(len(test))),
                                 "test_size": args.test_size, "run": f"counting baseline {name}",
                                 "score": scores.tolist()})
        print(path)


def pair_scores(argv: list[str]) -> None:
    """`bench/tallrec.py pair NAME=GLOB ... --diff A-B ...`: the test metrics (with 95% intervals) of each
    model's `score` shards on the rows every model has scored, and paired intervals of the differences."""
    import glob
    import json

    parser = argparse.ArgumentParser(prog="bench/tallrec.py pair")
    parser.add_argument("models", nargs="+", help="NAME=GLOB of `score` shard files")
    parser.add_argument("--diff", action="append", default=[], help="A-B: a paired difference to report")
    parser.add_argument("--group", action="append", default=[],
                        help="NAME=A,B,...: the same recipe's training seeds; mean and sample std of their AUC/UAUC")
    parser.add_argument("--results", required=True)
    args = parser.parse_args(argv)
    from recalign.data import load_dataset
    from recalign.eval.intervals import paired_predictions
    from recalign.io import atomic_write_json
    from recalign.tasks.ctr import TALLREC_SAMPLES, ctr_report, tallrec_protocol

    scored, sizes = {}, set()
    for spec in args.models:
        name, pattern = spec.split("=", 1)
        scored[name] = {}
        for path in sorted(glob.glob(pattern)):
            shard = json.loads(Path(path).read_text())
            sizes.add(shard["test_size"])
            scored[name].update({row: (shard["user"][i], shard["item"][i], shard["label"][i], score)
                                 for i, (row, score) in enumerate(zip(shard["rows"], shard["score"]))})
    if len(sizes) != 1:
        raise SystemExit(f"the shards come from different test draws: test sizes {sorted(sizes)}")
    test = tallrec_protocol(load_dataset("ml-100k"), {**TALLREC_SAMPLES, "test_size": sizes.pop()}).test
    rows = sorted(set.intersection(*(set(v) for v in scored.values())))
    frame = test.iloc[rows].reset_index(drop=True)
    records = {}
    for name, by_row in scored.items():
        user, item, label, score = (list(x) for x in zip(*(by_row[r] for r in rows)))
        if user != frame["user"].tolist() or item != frame["item"].tolist():
            raise SystemExit(f"{name}: its scored samples are not the test draw's rows")
        records[name] = {"user": user, "item": item, "label": label, "score": score}
    out = {"test_draw": len(test), "rows_scored_by_all": len(rows), "users": int(frame["user"].nunique()),
           "models": {name: ctr_report(frame, np.asarray(r["score"])) for name, r in records.items()},
           "differences": {}}
    for spec in args.diff:
        a, b = spec.split("-")
        out["differences"][spec] = paired_predictions(records[a], records[b])
    out["seed_groups"] = {}
    for spec in args.group:
        name, members = spec.split("=", 1)
        members = members.split(",")
        entry = {"models": members}
        for metric in ("auc", "uauc", "auc_warm", "auc_cold"):
            values = np.array([out["models"][m][metric] for m in members], dtype=np.float64)
            entry[metric] = {"mean": float(values.mean()),
                             "std": float(values.std(ddof=1)) if len(values) > 1 else None}
        out["seed_groups"][name] = entry
    for name, m in out["models"].items():
        print(f"{name}: AUC {m['auc']:.4f} {m['auc_ci']}  UAUC {m['uauc']:.4f} {m['uauc_ci']}  (n {m['n']})")
    for name, g in out["seed_groups"].items():
        spread = ", ".join(f"{k} {v['mean']:.4f} ± {v['std'] if v['std'] is None else round(v['std'], 4)}"
                           for k, v in g.items() if k != "models")
        print(f"{name} over {len(g['models'])} seeds: {spread}")
    for spec, d in out["differences"].items():
        print(f"{spec}: AUC {d['auc']['difference']:+.4f} {d['auc']['ci']}  UAUC {d['uauc']['difference']:+.4f} "
              f"{d['uauc']['ci']}")
    atomic_write_json(Path(args.results), out)


def compare_valid(argv: list[str]) -> None:
    """`bench/tallrec.py valid NAME=RUN_DIR ... --results FILE`: each finished TALLRec run's best valid AUC / UAUC
    (its `predictions-seed<S>-valid.json`, the checkpoint early stopping kept) and each run minus the first,
    paired on the same valid samples: the recipe study's decision numbers, read without any test score."""
    import json

    parser = argparse.ArgumentParser(prog="bench/tallrec.py valid")
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR; the first is the reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", required=True)
    args = parser.parse_args(argv)
    from recalign.eval.intervals import paired_predictions
    from recalign.io import atomic_write_json

    out, base = {}, None
    for spec in args.runs:
        name, directory = spec.split("=", 1)
        predictions = json.loads((Path(directory) / f"predictions-seed{args.seed}-valid.json").read_text())
        valid = json.loads((Path(directory) / "metrics.json").read_text())["valid"]
        out[name] = {"run": directory, **{k: valid[k] for k in ("auc", "auc_ci", "uauc", "uauc_ci", "n")}}
        if base is None:
            base = (name, predictions)
        else:
            out[name][f"minus_{base[0]}"] = paired_predictions(predictions, base[1])
        d = out[name].get(f"minus_{base[0]}")
        print(f"{name}: valid AUC {valid['auc']:.4f} [{valid['auc_ci'][0]:.4f}, {valid['auc_ci'][1]:.4f}] UAUC "
              f"{valid['uauc']:.4f}" + (f"; minus {base[0]}: AUC {d['auc']['difference']:+.4f} "
                                         f"[{d['auc']['ci'][0]:+.4f}, {d['auc']['ci'][1]:+.4f}]" if d else ""))
    atomic_write_json(Path(args.results), out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["valid"]:
        compare_valid(sys.argv[2:])
    elif sys.argv[1:2] == ["score"]:
        score_test(sys.argv[2:])
    elif sys.argv[1:2] == ["pair"]:
        pair_scores(sys.argv[2:])
    elif sys.argv[1:2] == ["baselines"]:
        score_baselines(sys.argv[2:])
    else:
        main()
