"""Benchmark: dataset loading cold (reader parses the files, writes the parquet cache) vs warm (the cache
is read), with the peak RSS of each load, for ML-100K (the embedded RecBole files), ML-1M, a synthetic
Amazon-2018-format JSON-lines file (1M reviews + metadata: JSON parsing is what makes a cold load of a real
review dump slow) and a synthetic 20M-interaction file in ML-1M format.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/readers.py [--big 20000000] [--amazon 1000000]

ML-1M's files are not on this machine, so an ML-1M-format directory of the same size is synthesised
(1,000,209 ratings, 6,040 users, 3,706 movies, movies.dat, users.dat; ids, ratings and times drawn at
random, ratings.dat of about the real 24 MB). The 20M file (~0.5 GB) is written in chunks. Every load runs
in a fresh process (`python -c`), so the peak RSS (ru_maxrss) is that load's own, next to the process's
RSS after imports; cold loads start from an empty cache directory. Writes bench/results/readers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

CHILD = """
import json, resource, sys, time
import recalign.data as data
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
ds = data.load_dataset(sys.argv[1], like_threshold=3.0)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_imports_mb": base / 1024, "interactions": len(ds.interactions),
                  "users": ds.n_users, "items": ds.n_items}))
"""


def write_ml1m_format(directory: Path, n_ratings: int, n_users: int, n_items: int, seed: int = 0,
                      chunk: int = 2_000_000) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ratings = directory / "ratings.dat"
    if ratings.exists() and (directory / "done").exists():
        return directory
    rng = np.random.default_rng(seed)
    with open(ratings, "w", encoding="latin-1") as handle:
        for start in range(0, n_ratings, chunk):
            count = min(chunk, n_ratings - start)
            users = rng.integers(1, n_users + 1, count)
            items = rng.integers(1, n_items + 1, count)
            stars = rng.integers(1, 6, count)
            stamps = rng.integers(956_703_932, 1_046_454_590, count)
            handle.write("\n".join(f"{u}::{i}::{r}::{t}" for u, i, r, t in zip(users.tolist(), items.tolist(),
                                                                               stars.tolist(), stamps.tolist())))
            handle.write("\n")
    genres = ["Drama", "Comedy", "Action", "Thriller", "Romance"]
    (directory / "movies.dat").write_text("".join(f"{i}::Movie {i} ({1919 + i % 81})::{genres[i % 5]}|{genres[i % 3]}\n"
                                                  for i in range(1, n_items + 1)), encoding="latin-1")
    (directory / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::{[1, 18, 25, 35, 45, 50, 56][u % 7]}::{u % 21}"
                                                 f"::{10000 + u}\n" for u in range(1, n_users + 1)), encoding="latin-1")
    (directory / "done").write_text("")
    return directory


def write_amazon_format(directory: Path, n_reviews: int, n_users: int, n_items: int, seed: int = 2,
                        chunk: int = 500_000) -> Path:
    """Amazon-2018-style JSON lines (reviewerID, asin, overall, unixReviewTime + review text) and metadata."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "done").exists():
        return directory
    rng = np.random.default_rng(seed)
    with open(directory / "Synthetic_5.json", "w") as handle:
        for start in range(0, n_reviews, chunk):
            count = min(chunk, n_reviews - start)
            rows = zip(rng.integers(0, n_users, count).tolist(), rng.integers(0, n_items, count).tolist(),
                       rng.integers(1, 6, count).tolist(), rng.integers(1_300_000_000, 1_540_000_000, count).tolist())
            handle.write("".join(json.dumps({"overall": float(r), "verified": True, "reviewerID": f"A{u:013d}",
                                             "asin": f"B{i:09d}", "unixReviewTime": t,
                                             "reviewText": "Works as described, would buy again.",
                                             "summary": "Good"}) + "\n" for u, i, r, t in rows))
    with open(directory / "meta_Synthetic.json", "w") as handle:
        handle.write("".join(json.dumps({"asin": f"B{i:09d}", "title": f"Product {i}", "brand": "Acme",
                                         "category": ["Home", "Kitchen"], "date": "March 3, 2015"}) + "\n"
                             for i in range(n_items)))
    (directory / "done").write_text("")
    return directory


def load_once(path: str, cache_dir: Path) -> dict:
    env = {**os.environ, "RECALIGN_DATA_CACHE": str(cache_dir), "RECALIGN_QUIET": "1",
           "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", CHILD, path], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, path: str, cache_dir: Path, cold_repeats: int, warm_repeats: int, source_mb: float) -> dict:
    cold, warm = [], []
    for _ in range(cold_repeats):
        shutil.rmtree(cache_dir, ignore_errors=True)
        cold.append(load_once(path, cache_dir))
        print(f"{name}: cold {cold[-1]['seconds']:.2f}s, peak RSS {cold[-1]['peak_rss_mb']:.0f} MB", flush=True)
    for _ in range(warm_repeats):
        warm.append(load_once(path, cache_dir))
        print(f"{name}: warm {warm[-1]['seconds']:.2f}s, peak RSS {warm[-1]['peak_rss_mb']:.0f} MB", flush=True)
    cache_mb = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) / 2 ** 20
    median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"dataset": name, "path": path, "source_mb": source_mb, "cache_mb": cache_mb,
            "interactions": cold[0]["interactions"], "users": cold[0]["users"], "items": cold[0]["items"],
            "cold_s": median(cold, "seconds"), "warm_s": median(warm, "seconds"),
            "speedup": median(cold, "seconds") / median(warm, "seconds"),
            "cold_peak_rss_mb": max(r["peak_rss_mb"] for r in cold),
            "warm_peak_rss_mb": max(r["peak_rss_mb"] for r in warm),
            "rss_after_imports_mb": median(cold + warm, "rss_after_imports_mb"), "cold": cold, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", type=int, default=20_000_000, help="interactions in the synthetic file")
    parser.add_argument("--amazon", type=int, default=1_000_000, help="reviews in the synthetic Amazon file")
    parser.add_argument("--work", default="/tmp/recalign-readers")
    parser.add_argument("--out", default="readers.json")
    parser.add_argument("--only", default="", help="comma-separated row names to run (ml-100k, ml-1m, amazon, "
                        "big); others are kept from an existing --out file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from recalign import assets
    from recalign.io import atomic_write_json

    work = Path(args.work)
    assets.fetch("ml-100k")
    ml1m = write_ml1m_format(work / "ml-1m", 1_000_209, 6040, 3706)
    only = set(filter(None, args.only.split(",")))
    started = time.perf_counter()
    big = work / f"synthetic-{args.big}"
    if not only or "big" in only:
        write_ml1m_format(big, args.big, 500_000, 100_000, seed=1)
    amazon = write_amazon_format(work / f"amazon-{args.amazon}", args.amazon, 200_000, 50_000)
    print(f"synthetic files ready ({time.perf_counter() - started:.0f}s)", flush=True)
    size = lambda d: sum(p.stat().st_size for p in Path(d).iterdir()) / 2 ** 20  # noqa: E731
    ml100k_dir = assets.home() / "assets"
    ml100k_mb = sum(p.stat().st_size for p in ml100k_dir.rglob("ml-100k.*") if p.is_file()) / 2 ** 20
    previous = json.loads((RESULTS / args.out).read_text()) if (RESULTS / args.out).exists() else {"rows": []}
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "loadavg_at_start": os.getloadavg()},
              "command": " ".join(["python", *sys.argv]), "rows": previous["rows"]}
    plan = [("ml-100k", "ML-100K (RecBole, embedded)", "ml-100k", 3, ml100k_mb),
            ("ml-1m", "ML-1M format (synthetic, same size)", str(ml1m), 3, size(ml1m)),
            ("amazon", f"Amazon JSON lines, {args.amazon:,} reviews (synthetic)", str(amazon), 1, size(amazon)),
            ("big", f"{args.big:,} interactions (ML-1M format)", str(big), 1, size(big) if big.exists() else 0)]
    for key, name, path, cold_n, mb in plan:
        if only and key not in only:
            continue
        load_before = os.getloadavg()
        row = {**measure(name, path, work / "cache", cold_n, 3, mb), "key": key, "loadavg_at_start": load_before}
        row["loadavg_at_end"] = os.getloadavg()
        result["rows"] = [r for r in result["rows"] if r.get("key") != key] + [row]
        result["rows"].sort(key=lambda r: [k for k, *_ in plan].index(r["key"]))
        atomic_write_json(RESULTS / args.out, result)
    print("\n| dataset | interactions | source MB | cache MB | cold s | warm s | cold/warm | peak RSS cold MB | "
          "peak RSS warm MB |\n|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['dataset']} | {r['interactions']:,} | {r['source_mb']:.0f} | {r['cache_mb']:.0f} | "
              f"{r['cold_s']:.2f} | {r['warm_s']:.2f} | {r['speedup']:.1f}x | {r['cold_peak_rss_mb']:.0f} | "
              f"{r['warm_peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
