"""Benchmark: every CF model on ML-100K, leave-one-out by time, full ranking with the history masked.

Prints a table (NDCG@10, HR@10, NDCG@20, HR@20, epochs, seconds/epoch, eval seconds) and writes
bench/results/cf.json. `--peer` also runs RecBole 1.2.1 (from a throwaway venv outside the repo, see
docs/benchmarks-cf.md) on the identical data file and protocol, one model at a time under a time bound.
The seed's sequential baselines (dros, dros-gru4rec, dros-caser, acvae, dreamrec) have no RecBole peer;
DreamRec's guidance weight is chosen on the valid split from `--guidance-grid`; DROS's alpha/beta on the
valid split from the pre-declared `DROS_GRID` (`--dros-grid`).

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/cf.py [--models sasrec,mf] [--peer] [--max-minutes M]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cf.json"
PEER_NAMES = {"pop": "Pop", "itemcf": "ItemKNN", "mf": "BPR", "lightgcn": "LightGCN", "gru4rec": "GRU4Rec",
              "sasrec": "SASRec", "caser": "Caser", "fism": "FISM"}
DEFAULT_PEERS = ["pop", "itemcf", "mf", "lightgcn", "gru4rec", "sasrec"]
# rows without a RecBole peer: name -> (registry model, model keys over its defaults)
OURS_ONLY = {"caser": ("caser", {}), "fism": ("fism", {}), "dros": ("dros", {}),
             "dros-gru4rec": ("dros", {"backbone": "gru4rec"}), "dros-caser": ("dros", {"backbone": "caser"}),
             "acvae": ("acvae", {}), "dreamrec": ("dreamrec", {})}
ROWS = [*PEER_NAMES, *[n for n in OURS_ONLY if n not in PEER_NAMES]]
DEFAULT_MODELS = [n for n in ROWS if n not in ("dros-gru4rec", "dros-caser")]
COLUMNS = ["ndcg@10", "hr@10", "ndcg@20", "hr@20"]
# DROS's alpha tried on the valid split, declared before any run: 0 (exactly its SASRec base), the reference's
# 0.1, and 10x smaller / larger; beta stays the reference's 1 (the log-sum-exp is dominated by the largest
# weighted squared score, where alpha and 1/beta act as one factor)
DROS_GRID = [(0.0, 1.0), (0.01, 1.0), (0.1, 1.0), (1.0, 1.0)]


def export_recbole(ds, directory: Path, name: str = "ml100k-loo") -> Path:
    """Write the Dataset's log as a RecBole atomic file. Timestamps become ts * 1000 + tie index within
    the user, so RecBole's (unstable) sort by time gives exactly recalign's (stable) order and the same
    leave-one-out split; ids are recalign's dense ids."""
    inter = ds.interactions
    ties = inter.groupby(["user", "timestamp"]).cumcount().to_numpy()
    stamps = inter["timestamp"].to_numpy(np.int64) * 1000 + ties
    folder = directory / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r:g}\t{t}" for u, i, r, t in zip(inter["user"], inter["item"], inter["rating"], stamps)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    return directory


def run_ours(names: list[str], seed: int, max_epochs: int | None, fixed_epochs: dict | None = None,
             max_minutes: float = 0.0, guidance_grid: tuple[float, ...] = (2.0,),
             dros_alpha: float | None = None, work: Path | None = None, save=None) -> dict:
    """Train and test each model with its method defaults; `fixed_epochs` {name: n} trains exactly n
    epochs instead (no early stopping) to compare with a peer that was stopped by its time bound;
    `max_minutes` caps each model's training time (the best valid epoch so far is kept); `dros_alpha` replaces
    DROS's alpha in every dros row. Each row keeps its per-case test NDCG@10 for paired comparisons. `work`:
    per-model checkpoint directories (a rerun resumes each model); `save(out)` is called after every model."""
    import torch

    from recalign.cf import leave_one_out_sets, train_cf_model
    from recalign.cf.evaluate import case_ranks
    from recalign.data import load_dataset
    from recalign.eval.intervals import ranking_with_intervals
    from recalign.eval.metrics import ndcg_per_case
    from recalign.methods import get_method

    torch.set_num_threads(int(os.environ.get("RECALIGN_THREADS", "2")))
    ds = load_dataset("ml-100k")
    data, valid, test = leave_one_out_sets(ds.interactions, ds.n_users, ds.n_items)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first optimiser imports torch._dynamo (~5 s)
    out = {}
    for name in names:
        model_name, overrides = OURS_ONLY.get(name, (name, {}))
        defaults = get_method(model_name).defaults  # the method's model + trainer settings
        config = {"model": dict(defaults.get("model", {})), "train": dict(defaults.get("train", {}))}
        config["model"].update(overrides)
        if model_name == "dros" and dros_alpha is not None:
            config["model"]["alpha"] = dros_alpha
        if max_epochs:
            config["train"]["epochs"] = min(config["train"]["epochs"], max_epochs)
        if max_minutes:
            config["train"]["max_minutes"] = max_minutes
        if fixed_epochs:
            config["train"].update(epochs=fixed_epochs[name], patience=0)
        started = time.perf_counter()
        store = None
        if work is not None:
            from recalign.io import Checkpoints
            store = Checkpoints(work / name)
        model = train_cf_model(model_name, data, config, valid=valid, seed=seed, run=store, checkpoint=model_name,
                               log=lambda m, name=name: print(f"{name}: {m}", file=sys.stderr, flush=True))
        train_seconds = time.perf_counter() - started
        extra = {}
        if model_name == "dreamrec":
            extra["guidance_valid"] = choose_guidance(model, valid, guidance_grid)
            config["model"]["guidance"] = model.params["guidance"]
        started = time.perf_counter()
        ranks = case_ranks(model, test)
        metrics = ranking_with_intervals(ranks, (10, 20))
        eval_seconds = time.perf_counter() - started
        summary = model.train_summary
        out[name] = {"test": metrics, "epochs": summary["epochs"], "best_epoch": summary["best_epoch"],
                     "seconds_per_epoch": summary["seconds_per_epoch"], "train_seconds": train_seconds,
                     "valid_eval_seconds": summary["valid_eval_seconds"], "test_eval_seconds": eval_seconds,
                     "stopped": summary["stopped"], "config": config, **extra,
                     "valid_curve": [r.get("valid") for r in summary["history"]],
                     "case_ndcg@10": [round(float(v), 6) for v in ndcg_per_case(ranks, 10)]}
        print(f"ours {name}: ndcg@10 {metrics['ndcg@10']:.4f} hr@10 {metrics['hr@10']:.4f} "
              f"epochs {summary['epochs']} s/epoch {summary['seconds_per_epoch']:.2f}", file=sys.stderr, flush=True)
        if save is not None:
            save(out)
    return out


def paired_with_backbones(ours: dict) -> dict:
    """Each DROS row minus its backbone's row (same test cases): mean NDCG@10 difference, paired 95% interval."""
    from recalign.eval.intervals import mean_interval

    out = {}
    for name, (model_name, overrides) in OURS_ONLY.items():
        base = overrides.get("backbone", "sasrec")
        if model_name != "dros" or "case_ndcg@10" not in ours.get(name, {}) \
                or "case_ndcg@10" not in ours.get(base, {}):
            continue
        difference = np.asarray(ours[name]["case_ndcg@10"]) - np.asarray(ours[base]["case_ndcg@10"])
        out[f"{name}-{base}"] = {"ndcg@10": float(difference.mean()), "ci": mean_interval(difference),
                                 "cases": len(difference)}
    return out


def choose_guidance(model, valid, grid: tuple[float, ...]) -> dict:
    """Set DreamRec's guidance weight to the grid value with the best valid NDCG@10 (the model was trained
    with its default; guidance only changes sampling). Returns {weight: valid NDCG@10}."""
    from recalign.cf import evaluate_ranking

    scores = {}
    for weight in grid:
        model.params["guidance"] = float(weight)
        scores[float(weight)] = evaluate_ranking(model, valid, ks=(10,))["ndcg@10"]
    model.params["guidance"] = max(scores, key=scores.get)
    print(f"dreamrec guidance on valid: {scores} -> {model.params['guidance']}", file=sys.stderr, flush=True)
    return scores


def _extend(store, name: str, epochs: int, patience: int) -> None:
    """Let a checkpoint that finished only because it reached fewer epochs continue to `epochs`."""
    saved = store.load_checkpoint(name)
    if saved is None or not saved["state"].get("done"):
        return
    state = saved["state"]
    if int(state["epoch"]) < epochs and not (patience and state.get("bad", 0) >= patience):
        state["done"] = False
        store.save_checkpoint(name, saved)


def dros_grid(seed: int, epochs: int, directory: Path, alphas: list[float] | None = None) -> dict:
    """DROS-SASRec's alpha chosen on the valid split: every DROS_GRID point trains `epochs` epochs (same seed,
    data and batch order; the best valid epoch is kept), the best valid NDCG@10 picks the point. Every point is
    then tested (the choice is made before), and the chosen one is compared with alpha = 0 (SASRec) on the
    same test cases with a paired interval."""
    import torch

    from recalign.cf import leave_one_out_sets, train_cf_model
    from recalign.cf.evaluate import case_ranks
    from recalign.data import load_dataset
    from recalign.eval.intervals import mean_interval, ranking_with_intervals
    from recalign.eval.metrics import ndcg_per_case
    from recalign.io import Checkpoints
    from recalign.methods import get_method

    torch.set_num_threads(int(os.environ.get("RECALIGN_THREADS", "1")))
    ds = load_dataset("ml-100k")
    data, valid, test = leave_one_out_sets(ds.interactions, ds.n_users, ds.n_items)
    defaults = get_method("dros").defaults
    grid, per_case = {}, {}
    for alpha, beta in [(a, b) for a, b in DROS_GRID if alphas is None or a in alphas]:
        key = f"alpha={alpha:g},beta={beta:g}"
        config = {"model": dict(defaults["model"], alpha=alpha, beta=beta), "train": dict(defaults["train"], epochs=epochs)}
        started = time.perf_counter()
        store = Checkpoints(directory / key)
        _extend(store, "dros", epochs, config["train"]["patience"])
        model = train_cf_model("dros", data, config, valid=valid, seed=seed, run=store, checkpoint="dros")
        summary = model.train_summary
        curve = [r.get("valid") for r in summary["history"]]
        ranks = case_ranks(model, test)
        grid[key] = {"alpha": alpha, "beta": beta, "valid_curve": curve, "best_valid": max(curve),
                     "best_epoch": curve.index(max(curve)) + 1, "epochs": len(curve),
                     "seconds_per_epoch": summary["seconds_per_epoch"], "wall_seconds": time.perf_counter() - started,
                     "test": ranking_with_intervals(ranks, (10, 20))}
        per_case[key] = ndcg_per_case(ranks, 10)
        print(f"dros grid {key}: best valid ndcg@10 {max(curve):.4f} (epoch {grid[key]['best_epoch']} of "
              f"{len(curve)})", file=sys.stderr, flush=True)
    chosen = max(grid, key=lambda k: (grid[k]["best_valid"], -grid[k]["alpha"]))
    base = "alpha=0,beta=1"
    if base not in grid:
        return {"grid": grid, "epochs": epochs, "threads": torch.get_num_threads()}
    difference = per_case[chosen] - per_case[base]
    paired = {"chosen_minus_alpha0": float(difference.mean()), "ci": mean_interval(difference),
              "cases": len(difference)}
    for key in grid:
        if key != base:
            d = per_case[key] - per_case[base]
            grid[key]["minus_alpha0"] = {"ndcg@10": float(d.mean()), "ci": mean_interval(d)}
    print(f"dros grid: chosen {chosen} on valid; test ndcg@10 {grid[chosen]['test']['ndcg@10']:.4f}, "
          f"minus alpha 0: {paired['chosen_minus_alpha0']:+.4f} {paired['ci']}", file=sys.stderr, flush=True)
    return {"grid": grid, "epochs": epochs, "chosen": chosen, "paired": paired, "config": defaults,
            "threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg()}


def step_cost(names: list[str], n_batches: int = 6, rounds: int = 3) -> dict:
    """Process CPU seconds (one thread) of loss + backward over the same `n_batches` batches of 2048 training
    targets, models round robin, best of `rounds`: the per-epoch cost ratio without the noise of a shared
    machine's wall clock."""
    import torch

    from recalign.cf import create_model, leave_one_out_sets
    from recalign.cf.batches import build_windows, window_batches
    from recalign.data import load_dataset

    torch.set_num_threads(1)
    ds = load_dataset("ml-100k")
    data, _, _ = leave_one_out_sets(ds.interactions, ds.n_users, ds.n_items)
    models, batches = {}, {}
    for name in names:
        model_name, overrides = OURS_ONLY.get(name, (name, {}))
        models[name] = model = create_model(model_name, ds.n_users, ds.n_items, **overrides)
        if not model.sequential:
            raise SystemExit(f"--step-cost: {name} is not a sequential model")
        model.prepare(data)
        model.train()
        windows = build_windows(data, model.max_len, model.stride)
        batches[name] = list(window_batches(windows, 2048, np.random.default_rng(0)))[:n_batches]
    seconds = {name: [] for name in names}
    for _ in range(rounds):
        for name, model in models.items():
            started = time.process_time()
            for batch in batches[name]:
                model.zero_grad()
                model.loss(batch, model.objectives[0]).backward()
            seconds[name].append(time.process_time() - started)
    best = {name: min(values) for name, values in seconds.items()}
    base = best.get("sasrec")
    return {name: {"cpu_seconds": value, **({"ratio_to_sasrec": value / base} if base else {})}
            for name, value in best.items()}


def run_peer(names: list[str], python: str, budget: float, seed: int) -> dict:
    from recalign.data import load_dataset

    ds = load_dataset("ml-100k")
    out = {}
    with tempfile.TemporaryDirectory(prefix="cf-peer-") as tmp:
        data_dir = export_recbole(ds, Path(tmp))
        for name in names:
            result_file = Path(tmp) / f"{name}.json"
            env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_WAIT_POLICY="PASSIVE")
            command = ["nice", "-n", "10", python, str(ROOT / "bench" / "cf_recbole.py"), "--model",
                       PEER_NAMES[name], "--data-dir", str(data_dir), "--budget-minutes", str(budget),
                       "--seed", str(seed), "--out", str(result_file)]
            started = time.perf_counter()
            proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
            wall = time.perf_counter() - started
            if proc.returncode != 0 or not result_file.exists():
                print(f"peer {name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                out[name] = {"error": proc.stderr[-1000:], "wall_seconds": wall}
                continue
            out[name] = dict(json.loads(result_file.read_text()), wall_seconds=wall)
            print(f"peer {name}: {proc.stdout.strip()}", file=sys.stderr, flush=True)
    return out


def table(results: dict) -> str:
    ours, peer = results.get("ours", {}), results.get("peer", {})
    head = ("| model | impl | NDCG@10 | HR@10 | NDCG@20 | HR@20 | epochs | s/epoch | eval s | note |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    paired = []
    for pair, d in results.get("paired", {}).items():
        paired.append(f"| {pair} (paired) | recalign | {d['ndcg@10']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
                    f"| | | | | | | NDCG@10 difference on the same {d['cases']} cases |")
    matched = results.get("ours_at_peer_epochs", {})
    for name in [n for n in ROWS if n in ours or n in peer]:
        sides = [("recalign", ours.get(name)), ("RecBole 1.2.1", peer.get(name))]
        if name in matched:
            sides.append((f"recalign, same {matched[name]['epochs']} epochs", matched[name]))
        for impl, side in sides:
            if not side:
                continue
            if "error" in side:
                rows.append(f"| {name} | {impl} | failed | | | | | | | {side['error'][-80:]!r} |")
                continue
            m = side["test"]
            note = side.get("stopped") or ""
            if side.get("bounded"):
                note = f"bounded at {side['budget_minutes']:g} min (not converged)"
            if side.get("stopped") == "time budget":
                note = f"time cap {side['config']['train']['max_minutes']:g} min"
            if "guidance_valid" in side:
                note += f", guidance w={side['config']['model']['guidance']:g} (valid)"
            cells = [f"{m[c]:.4f}" + (f" [{m[c + '_ci'][0]:.4f}, {m[c + '_ci'][1]:.4f}]" if m.get(c + "_ci") else "")
                     for c in COLUMNS]
            rows.append(f"| {name} | {impl} | " + " | ".join(cells)
                        + f" | {side['epochs']} | {side['seconds_per_epoch']:.2f} | {side['test_eval_seconds']:.2f} | {note} |")
    return "\n".join(rows + paired)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"recalign models to run ('' = none) out of {', '.join(ROWS)}")
    parser.add_argument("--peer", action="store_true", help="also run RecBole on the same protocol")
    parser.add_argument("--peer-models", default=",".join(DEFAULT_PEERS))
    parser.add_argument("--peer-python", default="/tmp/recbole-venv/bin/python")
    parser.add_argument("--peer-budget-minutes", type=float, default=15.0)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="training time cap per model (0 = none)")
    parser.add_argument("--guidance-grid", default="0,0.5,1,2,4",
                        help="DreamRec guidance weights tried on the valid split")
    parser.add_argument("--matched", action="store_true",
                        help="for every peer run stopped by its time bound, also train recalign's model for the "
                             "same number of epochs")
    parser.add_argument("--step-cost", action="store_true",
                        help="only measure the CPU cost of training steps of the --models (sequential) and exit")
    parser.add_argument("--dros-grid", action="store_true",
                        help="only choose DROS's alpha on the valid split (DROS_GRID), test every point")
    parser.add_argument("--grid-epochs", type=int, default=8,
                        help="--dros-grid: epochs per grid point (a larger value continues finished points)")
    parser.add_argument("--grid-alphas", default="", help="--dros-grid: only these alphas of DROS_GRID")
    parser.add_argument("--grid-key", default="dros_grid", help="--dros-grid: section of the results JSON")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-cf-dros-grid"),
                        help="--dros-grid: checkpoint directory (a rerun resumes)")
    parser.add_argument("--dros-alpha", type=float, default=None,
                        help="alpha for every dros row (default: the method's)")
    parser.add_argument("--checkpoints", default="",
                        help="per-model checkpoint directory for --models runs (a rerun resumes); '' = none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from recalign.io import atomic_write_json

    if args.step_cost:
        print(json.dumps(step_cost([n for n in args.models.split(",") if n]), indent=1))
        return
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.dros_grid:
        alphas = [float(a) for a in args.grid_alphas.split(",")] if args.grid_alphas else None
        grid = results[args.grid_key] = dros_grid(args.seed, args.grid_epochs, Path(args.work), alphas)
        grid["date"] = time.strftime("%Y-%m-%d %H:%M")
        atomic_write_json(out_path, results)
        print(json.dumps({k: v["best_valid"] for k, v in grid["grid"].items()}, indent=1))
        return
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor(), "python": platform.python_version()}
    names = [n for n in args.models.split(",") if n]
    if names:
        unknown = sorted(set(names) - set(ROWS))
        if unknown:
            parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
        grid = tuple(float(w) for w in args.guidance_grid.split(","))

        def save(rows: dict) -> None:
            results.setdefault("ours", {}).update(rows)
            results["ours_date"] = time.strftime("%Y-%m-%d %H:%M")
            results["paired"] = paired_with_backbones(results["ours"])
            atomic_write_json(out_path, results)

        run_ours(names, args.seed, args.max_epochs, max_minutes=args.max_minutes, guidance_grid=grid,
                 dros_alpha=args.dros_alpha, work=Path(args.checkpoints) if args.checkpoints else None, save=save)
    if args.peer:
        peers = [n for n in args.peer_models.split(",") if n]
        results.setdefault("peer", {}).update(run_peer(peers, args.peer_python, args.peer_budget_minutes, args.seed))
        results["peer_date"] = time.strftime("%Y-%m-%d %H:%M")
    if args.matched:
        bounded = {n: r["epochs"] for n, r in results.get("peer", {}).items() if r.get("bounded")}
        if bounded:
            results.setdefault("ours_at_peer_epochs", {}).update(
                run_ours(list(bounded), args.seed, None, fixed_epochs=bounded))
    atomic_write_json(out_path, results)
    print(table(results))


if __name__ == "__main__":
    main()
