"""Benchmark: approximate (FAISS HNSW / IVF, `recalign.eval.ann`) vs exact (`eval.grounding.l2_topk`)
grounding on large synthetic catalogues: recall@20 against the exact answer, queries/s, build time, memory.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ann.py --sizes 100000,1000000
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/ann.py --sizes 5000000 --streamed --out ann-5m.json

The catalogue is synthetic (no model can embed a million titles on this CPU), d = 576 (SmolLM2-135M's
hidden size), shaped like SmolLM2-135M's last-token embeddings of the 1,682 ML-100K titles: their PCA
spectrum falls as a power law (variance of component i ~ 250 * i^-1.29, 90% of it in ~100 components),
and they are clustered (mean / nearest-neighbour distance 2.15). Items are drawn from a mixture: 1,024
centres ~ N(0, diag(spectrum)), each item = centre + 0.5 * N(0, diag(spectrum)), in a fixed random
rotation; at 1,665 items this mixture gives a mean / nearest distance ratio of 2.2 (real: 2.15). Queries
are half perturbed catalogue items (a generated title close to a real one) and half fresh draws. Recall on
real catalogues of this size may differ: the structure of a million real titles is unmeasured here.

Exact and approximate searches run in the same process on the same queries (batch of all queries), each
timed `--repeats` times (median). `--streamed` never holds the catalogue: it is generated in chunks, the
exact answer is a running top-20 over the chunks (its time is the sum of the chunk searches, generation
excluded) and the index is IVF with 8-bit scalar codes (no exact re-scoring: the vectors are not kept).
Writes bench/results/ann.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"
D, CENTRES, SPREAD, K = 576, 1024, 0.5, 20


class Catalogue:
    """Deterministic synthetic embeddings: row block [start, start + rows) is the same on every call."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.scale = np.sqrt(250.0 * np.arange(1, D + 1) ** -1.2945).astype(np.float32)
        self.rotation = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
        self.centres = rng.standard_normal((CENTRES, D), dtype=np.float32) * self.scale

    def rows(self, start: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start])
        out = self.centres[rng.integers(0, CENTRES, count)]
        out += SPREAD * rng.standard_normal((count, D), dtype=np.float32) * self.scale
        return out @ self.rotation

    def queries(self, n_items: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 10 ** 12])
        near = np.concatenate([self.rows(int(i), 1) for i in rng.integers(0, n_items, count // 2)])
        near += 0.1 * SPREAD * (rng.standard_normal(near.shape, dtype=np.float32) * self.scale) @ self.rotation
        fresh = self.rows(n_items + 10 ** 9, count - count // 2)
        return np.ascontiguousarray(np.concatenate([near, fresh]))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def current_rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times, out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def run_in_memory(n: int, n_queries: int, repeats: int, sweeps: dict, cat: Catalogue, build: dict,
                  save) -> list[dict]:
    from recalign.eval.ann import AnnSearcher, build_index, index_params
    from recalign.eval.grounding import l2_topk, sq_norms

    started = time.perf_counter()
    items = np.concatenate([cat.rows(s, min(262144, n - s)) for s in range(0, n, 262144)])
    gen_s = time.perf_counter() - started
    queries = cat.queries(n, n_queries)
    items_t, queries_t = torch.from_numpy(items), torch.from_numpy(queries)
    norms = sq_norms(items_t)
    exact_s, exact_times, (_, truth) = timed(lambda: l2_topk(queries_t, items_t, K, catalogue_sq_norms=norms),
                                             repeats)
    truth = truth.numpy()
    rows = [{"items": n, "method": "exact (l2_topk)", "params": "", "build_s": 0.0, "recall@20": 1.0,
             "qps": n_queries / exact_s, "times_s": exact_times, "speedup": 1.0,
             "index_gb": 0.0, "rss_gb_now": current_rss_gb(), "generate_s": gen_s}]
    print(f"n={n}: exact {n_queries / exact_s:.1f} q/s", flush=True)
    save(rows)
    for method, settings in sweeps.items():
        search, codec = (method.split("-") + ["flat"])[:2]
        ann = {**build, "codec": codec}
        params = index_params(search, ann, n)
        before = current_rss_gb()
        started = time.perf_counter()
        index = build_index(items, params)
        build_s = time.perf_counter() - started
        index_gb = current_rss_gb() - before
        for value in settings:
            key = "ef_search" if search == "hnsw" else "nprobe"
            searcher = AnnSearcher(index, params, items)
            searcher.set_query_params({**ann, key: value})
            qps_s, times, (_, found) = timed(lambda: searcher.search(queries, K, candidates=K), repeats)
            rows.append({"items": n, "method": method, "params": f"{params} {key}={value}", "build_s": build_s,
                         "recall@20": recall(found, truth), "qps": n_queries / qps_s, "times_s": times,
                         "speedup": exact_s / qps_s, "index_gb": index_gb, "rss_gb_now": current_rss_gb()})
            print(f"n={n}: {method} {key}={value}: recall@20 {rows[-1]['recall@20']:.4f}, "
                  f"{rows[-1]['qps']:.0f} q/s ({rows[-1]['speedup']:.1f}x exact), build {build_s:.0f}s", flush=True)
            save(rows)
        del index, searcher
    return rows


def run_streamed(n: int, n_queries: int, nprobes: list[int], cat: Catalogue, nlist: int) -> list[dict]:
    import faiss

    from recalign.eval.grounding import l2_topk

    chunk = 262144
    queries = cat.queries(n, n_queries)
    queries_t = torch.from_numpy(queries)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(D), D, nlist, faiss.ScalarQuantizer.QT_8bit)
    index.cp.niter = 10  # as recalign.eval.ann.build_index
    started = time.perf_counter()
    index.train(cat.rows(10 ** 10, 32 * nlist))  # training draws from the same distribution
    train_s = time.perf_counter() - started
    best_d = best_i = None
    exact_s = add_s = 0.0
    for start in range(0, n, chunk):
        rows = cat.rows(start, min(chunk, n - start))
        t0 = time.perf_counter()
        d, i = l2_topk(queries_t, torch.from_numpy(rows), K)
        exact_s += time.perf_counter() - t0
        i = i + start
        if best_d is not None:
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
            order = np.lexsort((i.numpy(), d.numpy()), axis=1)[:, :K]
            d, i = d.gather(1, torch.from_numpy(order)), i.gather(1, torch.from_numpy(order))
        best_d, best_i = d, i
        t0 = time.perf_counter()
        index.add(rows)
        add_s += time.perf_counter() - t0
        print(f"  {start + len(rows)}/{n} rows, rss {current_rss_gb():.2f} GB", flush=True)
        del rows
    truth = best_i.numpy()
    out = [{"items": n, "method": "exact (l2_topk, streamed chunks)", "params": "", "build_s": 0.0,
            "recall@20": 1.0, "qps": n_queries / exact_s, "times_s": [exact_s], "speedup": 1.0, "index_gb": 0.0}]
    index_gb = index.sa_code_size() * n / 2 ** 30
    for nprobe in nprobes:
        index.nprobe = nprobe
        seconds, times, (_, found) = timed(lambda: index.search(queries, K), 1)
        out.append({"items": n, "method": "ivf-sq8", "params": f"nlist={nlist} nprobe={nprobe}",
                    "build_s": train_s + add_s, "recall@20": recall(found, truth), "qps": n_queries / seconds,
                    "times_s": times, "speedup": exact_s / seconds, "index_gb": index_gb})
        print(f"n={n}: ivf-sq8 nprobe={nprobe}: recall@20 {out[-1]['recall@20']:.4f}, {out[-1]['qps']:.0f} q/s "
              f"({out[-1]['speedup']:.1f}x exact)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="hnsw,ivf")
    parser.add_argument("--ef", default="16,32,64,128")
    parser.add_argument("--nprobe", default="4,8,16,32")
    parser.add_argument("--streamed", action="store_true")
    parser.add_argument("--nlist", type=int, default=0, help="IVF cells (0 = 4 * sqrt(items), the config default)")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--out", default="ann.json")
    args = parser.parse_args()
    import faiss

    from recalign.io import atomic_write_json

    ints = lambda text: [int(v) for v in text.split(",") if v]
    cat = Catalogue()
    sweeps = {m: ints(args.ef) if m == "hnsw" else ints(args.nprobe) for m in args.methods.split(",") if m}
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "loadavg_at_start": os.getloadavg(), "faiss": faiss.__version__,
                          "faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads()},
              "command": " ".join(["python", *sys.argv]), "d": D, "k": K, "queries": args.queries, "rows": []}
    done: list[dict] = []

    def save(rows: list[dict]) -> None:
        result["rows"] = done + rows
        result["peak_rss_gb"] = rss_gb()
        result["loadavg_at_end"] = os.getloadavg()
        atomic_write_json(RESULTS / args.out, result)

    build = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "nlist": args.nlist}
    for n in ints(args.sizes):
        rows = (run_streamed(n, args.queries, ints(args.nprobe), cat, args.nlist or int(4 * np.sqrt(n)))
                if args.streamed else run_in_memory(n, args.queries, args.repeats, sweeps, cat, build, save))
        done += rows
        save([])
    print("\n| items | method | params | build s | recall@20 | queries/s | x exact |\n|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['items']:,} | {r['method']} | {r['params']} | {r['build_s']:.0f} | {r['recall@20']:.4f} | "
              f"{r['qps']:.0f} | {r['speedup']:.1f} |")
    print(f"peak RSS {result['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
