"""Benchmark: BIGRec on ML-100K (the seed's few-shot table in miniature) and grounding speed.

    # grounding speed: exact L2 top-20 for 1,000 queries against 1.7k / 100k / 1M synthetic items
    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/bigrec.py speed [--dims 64,576] [--sizes ...]

    # quality: CF baselines on the same N samples and on all training data, BIGRec, + popularity, + SASRec
    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/bigrec.py quality [--shots 1024 --epochs 1
        --valid 100 --test 200 --beams 4 --out bench/runs/bigrec]

Speed peers, timed in the same process on the same data:
- `chunked` (ours, `recalign.eval.grounding.l2_topk`): batched GEMM over item chunks, running top-k, float64
  re-scoring of the candidates; checked exact against a float64 brute force on a subset of queries.
- `cdist+topk`: the reference code's way (`torch.cdist` of all queries x all items, then topk) — one
  [queries, items] matrix, so only where it fits in memory (skipped at 1M: 4 GB).
- `per-query numpy`: one query at a time, vectorised over items (timed on a few queries, extrapolated).
- `per-item loop`: a Python loop over items per query (timed on a subset, extrapolated to all pairs).
Writes bench/results/bigrec-speed.json / bigrec-quality.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "loadavg_at_start": load}


def _write(name: str, data: dict) -> Path:
    from recalign.io import atomic_write_json

    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path


# ------------------------------------------------------------------------------------------- speed
def brute_topk_f64(queries: torch.Tensor, catalogue: torch.Tensor, k: int, chunk: int = 100_000):
    """Reference answer: float64 distances, stable sort by (distance, index)."""
    best_d = best_i = None
    q = queries.double()
    for c0 in range(0, catalogue.shape[0], chunk):
        d = torch.cdist(q, catalogue[c0:c0 + chunk].double())
        i = torch.arange(c0, c0 + d.shape[1]).expand_as(d)
        if best_d is not None:
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
        order = np.lexsort((i.numpy(), d.numpy()), axis=1)[:, :k]
        order = torch.from_numpy(order)
        best_d, best_i = d.gather(1, order), i.gather(1, order)
    return best_d, best_i


def per_item_loop(queries: np.ndarray, catalogue: np.ndarray, k: int) -> list[list[int]]:
    out = []
    for q in queries:
        dists = []
        for i in range(catalogue.shape[0]):
            diff = catalogue[i] - q
            dists.append((float(diff @ diff), i))
        dists.sort()
        out.append([i for _, i in dists[:k]])
    return out


def per_query_numpy(queries: np.ndarray, catalogue: np.ndarray, k: int, chunk: int = 100_000) -> np.ndarray:
    out = []
    for q in queries:
        d = np.concatenate([((catalogue[c0:c0 + chunk] - q) ** 2).sum(1) for c0 in range(0, len(catalogue), chunk)])
        top = np.argpartition(d, k)[:k]
        out.append(top[np.argsort(d[top], kind="stable")])
    return np.stack(out)


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def run_speed(args) -> dict:
    from recalign.eval.grounding import l2_topk

    k, n_queries = 20, args.queries
    rows = []
    for dim in [int(d) for d in args.dims.split(",")]:
        for n_items in [int(s) for s in args.sizes.split(",")]:
            gen = torch.Generator().manual_seed(n_items + dim)
            catalogue = torch.randn(n_items, dim, generator=gen)
            queries = torch.randn(n_queries, dim, generator=gen)
            repeats = 3 if n_items <= 100_000 else 2
            ours_s, (dist, index) = _timed(lambda: l2_topk(queries, catalogue, k), repeats)
            check = min(n_queries, 20)
            _, ref_i = brute_topk_f64(queries[:check], catalogue, k)
            exact = bool(torch.equal(index[:check], ref_i))
            row = {"dim": dim, "items": n_items, "queries": n_queries, "k": k, "chunked_s": ours_s,
                   "chunked_qps": n_queries / ours_s, "exact_vs_float64_bruteforce": exact, "checked_queries": check}
            if n_items * n_queries * 4 <= 1_000_000_000:  # the [Q, N] float32 matrix fits in ~1 GB
                cd_s, _ = _timed(lambda: torch.topk(torch.cdist(queries, catalogue), k, largest=False), repeats)
                row.update(cdist_topk_s=cd_s, cdist_topk_qps=n_queries / cd_s)
            q_np, c_np = queries.numpy(), catalogue.numpy()
            n_pq = 20 if n_items <= 100_000 else 5
            pq_s, _ = _timed(lambda: per_query_numpy(q_np[:n_pq], c_np, k), 1)
            row.update(per_query_numpy_s_extrapolated=pq_s * n_queries / n_pq, per_query_numpy_measured_queries=n_pq)
            loop_items = min(n_items, 20_000)
            loop_q = 2
            loop_s, _ = _timed(lambda: per_item_loop(q_np[:loop_q], c_np[:loop_items], k), 1)
            per_pair = loop_s / (loop_q * loop_items)
            row.update(loop_s_extrapolated=per_pair * n_items * n_queries, loop_measured_pairs=loop_q * loop_items,
                       loop_seconds_per_pair=per_pair)
            row["speedup_vs_loop"] = row["loop_s_extrapolated"] / ours_s
            row["speedup_vs_per_query_numpy"] = row["per_query_numpy_s_extrapolated"] / ours_s
            rows.append(row)
            print(f"d={dim} items={n_items}: chunked {ours_s:.3f}s ({row['chunked_qps']:.0f} q/s, exact={exact}), "
                  f"loop ~{row['loop_s_extrapolated']:.0f}s, x{row['speedup_vs_loop']:.0f}", file=sys.stderr, flush=True)
            del catalogue
    result = {"machine": machine(), "command": " ".join(sys.argv), "rows": rows}
    print(speed_table(rows))
    path = _write("bigrec-speed.json", result)
    print(f"\nwrote {path}", file=sys.stderr)
    return result


def speed_table(rows: list[dict]) -> str:
    lines = ["| dim | items | chunked exact top-20 (s) | queries/s | exact | cdist+topk (s) | per-query numpy (s, extrap.) "
             "| per-item loop (s, extrap.) | speed-up vs loop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cd = f"{r['cdist_topk_s']:.3f}" if "cdist_topk_s" in r else "– (4 GB matrix)"
        lines.append(f"| {r['dim']} | {r['items']:,} | {r['chunked_s']:.3f} | {r['chunked_qps']:,.0f} | "
                     f"{'yes' if r['exact_vs_float64_bruteforce'] else 'NO'} | {cd} | "
                     f"{r['per_query_numpy_s_extrapolated']:.1f} | {r['loop_s_extrapolated']:,.0f} | "
                     f"{r['speedup_vs_loop']:,.0f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- quality
KS = [1, 3, 5, 10, 20]
CF_MODELS = ["gru4rec", "caser", "sasrec"]


def cf_config(name: str, args) -> dict:
    """The registered CF method's model and trainer sections (what `recalign run NAME` trains with)."""
    from recalign.methods import get_method

    defaults = get_method(name).defaults
    config = {"model": dict(defaults.get("model", {})), "train": dict(defaults.get("train", {}))}
    if args.cf_epochs:
        config["train"]["epochs"] = args.cf_epochs
    if args.cf_minutes:
        config["train"]["max_minutes"] = args.cf_minutes
    return config


def run_cf_baselines(args, ds, split, shots, valid, test) -> dict:
    """GRU4Rec / Caser / SASRec (and Pop) trained on the N few-shot samples and on all training-period
    interactions; evaluated on BIGRec's own valid/test cases (full histories masked, every case counted)."""
    from recalign.cf import evaluate_ranking, train_cf_model
    from recalign.tasks.next_item import Cases, full_histories

    cases = {name: Cases(frame["user"].to_numpy(np.int64), full_histories(ds, frame),
                         frame["item"].to_numpy(np.int64)) for name, frame in (("valid", valid), ("test", test))}
    cutoff = split.train["timestamp"].max()
    period = ds.interactions[ds.interactions["timestamp"] <= cutoff]
    data = {"shots": shots, "all": period}
    out = {}
    for name in ["pop", *CF_MODELS]:
        for tag, train in data.items():
            if name == "pop" and tag == "shots":
                continue
            config = cf_config(name, args) if name != "pop" else {}
            started = time.perf_counter()
            model = train_cf_model(name, train, config, catalog=ds, valid=cases["valid"], seed=args.seed)
            seconds = time.perf_counter() - started
            metrics = evaluate_ranking(model, cases["test"], ks=KS)
            valid_metrics = evaluate_ranking(model, cases["valid"], ks=KS)
            label = f"{name} ({len(train):,} {'samples' if tag == 'shots' else 'interactions'})"
            out[f"{name}-{tag}"] = {"label": label, "test": metrics, "valid": valid_metrics, "train_seconds": seconds,
                                    "summary": getattr(model, "train_summary", None), "config": config}
            print(f"{label}: ndcg@10 {metrics['ndcg@10']:.4f} hr@10 {metrics['hr@10']:.4f} ({seconds:.0f}s)",
                  file=sys.stderr, flush=True)
    return out


def run_quality(args) -> dict:
    from recalign.data import few_shot, load_dataset
    from recalign.methods import get_method
    from recalign.runner import run_method
    from recalign.tasks.next_item import generative_samples

    started_all = time.perf_counter()
    ds = load_dataset("ml-100k")
    samples_cfg = {**get_method("bigrec").defaults["samples"], "valid_size": args.valid, "test_size": args.test}
    split, valid, test = generative_samples(ds, samples_cfg)
    shots = few_shot(split.train, args.shots, args.seed)
    result = {"machine": machine(), "command": " ".join(sys.argv), "args": vars(args),
              "samples": {**split.sizes(), "shots": len(shots), "valid_cases": len(valid), "test_cases": len(test)}}
    previous = RESULTS / "bigrec-quality.json"
    if args.skip_cf and previous.is_file():  # keep the CF rows of an earlier run with the same cases
        earlier = json.loads(previous.read_text())
        if earlier.get("samples") == result["samples"] and "cf" in earlier:
            result["cf"] = earlier["cf"]
    if not args.skip_cf:
        result["cf"] = run_cf_baselines(args, ds, split, shots, valid, test)
        _write("bigrec-quality.json", result)
    if not args.skip_llm:
        out = Path(args.out)
        sets = [f"model.name={args.model}", f"train.shots={args.shots}", f"train.epochs={args.epochs}",
                f"samples.valid_size={args.valid}", f"samples.test_size={args.test}", f"generate.beams={args.beams}",
                f"seed={args.seed}", "inject.cf_model=sasrec", "inject.cf_data=all",
                f"train.valid_loss_size={args.valid_loss}"]
        if args.cf_epochs:
            sets.append(f"inject.cf_train.epochs={args.cf_epochs}")
        if args.cf_minutes:
            sets.append(f"inject.cf_train.max_minutes={args.cf_minutes}")
        sets += args.set or []
        started = time.perf_counter()
        metrics = run_method("bigrec", "ml-100k", out, sets=sets, resume=out.exists())
        if (out / "cases-test.json").is_file():
            result["analysis"] = analyze_cases(out)
        result["diagnostics"] = diagnostics(out)
        result["bigrec"] = {"run_dir": str(out), "sets": sets, "wall_seconds": time.perf_counter() - started,
                            "variants": {k: {"test": v["test"], "valid": v["valid"], "gamma": v.get("gamma")}
                                         for k, v in metrics["variants"].items()},
                            "generation": metrics["generation"], "seconds": metrics["seconds"],
                            "train_summary": metrics["train_summary"], "examples": metrics["examples"]}
    result["wall_seconds"] = time.perf_counter() - started_all
    print(quality_table(result))
    path = _write("bigrec-quality.json", result)
    print(f"\nwrote {path}", file=sys.stderr)
    return result


def analyze_cases(run_dir: Path) -> dict:
    """Where BIGRec's ranking comes from: hits split by whether the generated text is a real title, and
    how popular the generated items are compared with the targets (from the run's cases-test.json)."""
    from recalign.data import load_dataset

    cases = json.loads((run_dir / "cases-test.json").read_text())
    ds = load_dataset("ml-100k")
    titles = ds.titles()
    index = {t: i for i, t in enumerate(titles)}
    counts = np.bincount(ds.interactions["item"].to_numpy(), minlength=ds.n_items)
    pct = counts.argsort().argsort() / (ds.n_items - 1)  # popularity percentile of each item (whole log)
    ranks = np.array([c["rank"] for c in cases])
    valid = np.array([c["valid_title"] for c in cases])
    out = {"cases": len(cases), "valid_generations": int(valid.sum()),
           "exact_target": int(sum(c["generated"].casefold() == c["target"].casefold() for c in cases)),
           "median_target_rank": float(np.median(ranks)),
           "median_target_rank_pop": float(np.median([c["rank_pop"] for c in cases])) if "rank_pop" in cases[0] else None,
           "median_target_rank_cf": float(np.median([c["rank_cf"] for c in cases])) if "rank_cf" in cases[0] else None,
           "target_popularity_percentile": float(np.mean([pct[index[c["target"]]] for c in cases])),
           "nearest_popularity_percentile": float(np.mean([pct[index[c["nearest"]]] for c in cases]))}
    for name, mask in (("valid", valid), ("invalid", ~valid)):
        if mask.any():
            out[f"hr@10_{name}_generations"] = float((ranks[mask] < 10).mean())
            out[f"hr@1_{name}_generations"] = float((ranks[mask] < 1).mean())
    return out


def _move_article(title: str) -> str:
    """"Deer Hunter, The (1978)" -> "The Deer Hunter (1978)" (how people, and LLMs, usually write it)."""
    import re

    match = re.match(r"^(.*), (The|A|An) (\(\d{4}\))$", title)
    return f"{match.group(2)} {match.group(1)} {match.group(3)}" if match else title


def ground(backbone, texts: list[list[str]], catalogue: torch.Tensor, g: dict) -> torch.Tensor:
    """BIGRec's grounding from public pieces: distances [cases, beams, items] of every generated beam to every
    catalogue item, both embedded by the frozen base model (`grounding.pooling` / `grounding.batch_size`)."""
    from recalign.eval.grounding import clean_generation, l2_distances

    beams = len(texts[0])
    flat = [clean_generation(t) or " " for row in texts for t in row]
    queries = backbone.embed(flat, pooling=g["pooling"], batch_size=int(g["batch_size"]), adapter=False)
    return l2_distances(queries, catalogue).view(len(texts), beams, -1)


def diagnostics(run_dir: Path) -> dict:
    """From a finished run's checkpoints (no generation): (1) beam aggregation variants of the same beams;
    (2) how well L2 grounding with the frozen base model recovers the TARGET from perturbed forms of its
    title (no year / article moved to the front / lower case) — the grounding step on its own."""
    import yaml

    from recalign import assets
    from recalign.data import load_dataset
    from recalign.eval.grounding import CatalogueCache, aggregate_beams, l2_distances, model_fingerprint, rank_metrics
    from recalign.io import Checkpoints
    from recalign.llm import Backbone, fill
    from recalign.tasks.next_item import full_histories, generative_samples, history_mask

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ds = load_dataset("ml-100k")
    _, _, test = generative_samples(ds, cfg["samples"])
    generated = Checkpoints(run_dir / "checkpoints").load_checkpoint("generations-test")
    if generated is None or len(generated["texts"]) != len(test):
        raise SystemExit(f"{run_dir}: no finished test generations (checkpoints/generations-test.safetensors)")
    backbone = Backbone.from_config(cfg["model"])
    base_id = model_fingerprint(backbone.causal_lm, cfg["model"]["name"])
    targets = torch.from_numpy(test["item"].to_numpy(np.int64).copy())
    mask = history_mask(full_histories(ds, test), ds.n_items)
    titles = ds.titles()
    item_texts = [fill(cfg["grounding"]["item_text"], "grounding.item_text", title=t) for t in titles]
    forms = {"exact title": lambda t: t, "no year": lambda t: t.rsplit(" (", 1)[0],
             "article moved to front": _move_article, "lower case": str.lower}
    out = {"beams": {}, "grounding_from_target_title": {}}
    for pooling in ("last", "mean"):  # the run's pooling and the other one, on the same generations
        g = {**cfg["grounding"], "pooling": pooling}
        cache = CatalogueCache(g["cache_dir"] or assets.home() / "grounding")
        catalogue, _ = cache.get(item_texts, lambda t: backbone.embed(t, pooling=pooling, adapter=False), base_id,
                                 extra=f"pooling={pooling}")
        per_beam = ground(backbone, generated["texts"], catalogue, g)
        for mode in ("top", "min", "weighted"):
            dist = aggregate_beams(per_beam, torch.tensor(generated["scores"]), mode)
            out["beams"][f"{pooling} pooling, {mode}"] = {
                k: v for k, v in rank_metrics(dist, targets, KS, mask).items() if k.startswith(("ndcg@", "hr@"))}
        for name, form in forms.items():
            texts = [form(titles[int(i)]) for i in targets]
            dist = l2_distances(backbone.embed(texts, pooling=pooling, adapter=False), catalogue)
            out["grounding_from_target_title"][f"{pooling}: {name}"] = float((dist.argmin(1) == targets).float().mean())
    return out


def quality_table(result: dict) -> str:
    columns = [f"ndcg@{k}" for k in KS] + [f"hr@{k}" for k in KS]
    lines = ["| model | " + " | ".join(c.upper().replace("NDCG", "NG") for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    rows = [(v["label"], v["test"]) for v in result.get("cf", {}).values()]
    n = result["samples"]["shots"]
    names = {"bigrec": f"BIGRec ({n})", "bigrec+pop": f"BIGRec ({n}) + popularity",
             "bigrec+sasrec": f"BIGRec ({n}) + SASRec"}
    rows += [(names.get(k, k), v["test"]) for k, v in result.get("bigrec", {}).get("variants", {}).items()]
    for label, metrics in rows:
        lines.append(f"| {label} | " + " | ".join(f"{metrics.get(c, float('nan')):.4f}" for c in columns) + " |")
    gen = result.get("bigrec", {}).get("generation", {}).get("test")
    if gen:
        lines += ["", f"Generation (test, top beam): validity {gen['validity']:.3f}, in catalogue "
                      f"{gen['in_catalogue']:.3f}, exact target {gen['exact_target']:.3f}, "
                      f"{gen['distinct_titles']} distinct titles / {gen['cases']} cases"]
    diag = result.get("diagnostics")
    if diag:
        lines += ["", "| beams aggregated | " + " | ".join(c.upper().replace("NDCG", "NG") for c in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for mode, metrics in diag["beams"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
        lines += ["", "Grounding the target's own title, perturbed (share whose nearest item is the target): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in diag["grounding_from_target_title"].items())]
    analysis = result.get("analysis")
    if analysis:
        lines += ["", "Analysis (test): " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in analysis.items() if v is not None)]
    return "\n".join(lines)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"),
                        help="where the JSON results go (default: bench/results, the committed evidence the docs cite; "
                             "a trial or smaller run belongs elsewhere)")
    sub = parser.add_subparsers(dest="part", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--dims", default="64,576")
    speed.add_argument("--sizes", default="1682,100000,1000000")
    speed.add_argument("--queries", type=int, default=1000)
    quality = sub.add_parser("quality")
    quality.add_argument("--shots", type=int, default=1024)
    quality.add_argument("--epochs", type=int, default=1)
    quality.add_argument("--valid", type=int, default=100)
    quality.add_argument("--test", type=int, default=200)
    quality.add_argument("--beams", type=int, default=4)
    quality.add_argument("--model", default="smollm2-135m-instruct")
    quality.add_argument("--valid-loss", type=int, default=64, help="valid samples for LoRA early stopping")
    quality.add_argument("--cf-epochs", type=int, default=0, help="cap on CF epochs (0 = CF defaults)")
    quality.add_argument("--cf-minutes", type=float, default=0.0, help="cap on each CF model's training time")
    quality.add_argument("--out", default=str(ROOT / "runs" / "bench-bigrec"))
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--set", action="append", help="extra bigrec --set key=value")
    quality.add_argument("--skip-cf", action="store_true")
    quality.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args()
    RESULTS = Path(args.results_dir)
    torch.set_num_threads(int(os.environ.get("RECALIGN_THREADS", "2")))
    os.environ.setdefault("RECALIGN_QUIET", "1")
    run_speed(args) if args.part == "speed" else run_quality(args)


if __name__ == "__main__":
    main()
