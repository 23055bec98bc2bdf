"""Benchmark table of finished next-item runs on the same test cases: NDCG@10 / HR@10 with 95% intervals, the
collapse diagnostics each run reports (`generation.distinct_items`, top title and share, popularity percentile
of the first items vs the targets'), and each run minus the first one, paired on the per-case ranks of
`cases-test.json` (the bootstrap of the per-case NDCG@10 difference). Used for P5's decodings
(docs/benchmarks-generative.md); any method whose cases-test.json rows carry `rank` works.

    .venv/bin/python bench/compare_runs.py NAME=RUN_DIR [NAME=RUN_DIR ...] --results bench/results/X.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(run: Path) -> tuple[np.ndarray, dict]:
    cases = json.loads((run / "cases-test.json").read_text())
    ranks = np.asarray([np.inf if c["rank"] is None else c["rank"] for c in cases], dtype=np.float64)
    return ranks, json.loads((run / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR; the first is the reference of the paired column")
    parser.add_argument("--results", required=True, help="the JSON to write")
    args = parser.parse_args()
    from recalign.eval.intervals import mean_interval
    from recalign.eval.metrics import ndcg_per_case
    from recalign.io import atomic_write_json

    rows, base = {}, None
    for spec in args.runs:
        name, directory = spec.split("=", 1)
        ranks, metrics = load(Path(directory))
        per_case = ndcg_per_case(ranks, 10)
        gen = metrics.get("generation", {})
        row = {"run": directory, "cases": len(ranks), "ndcg@10": float(per_case.mean()),
               "ndcg@10_ci": mean_interval(per_case), "hr@10": float((ranks < 10).mean()),
               "hr@10_ci": mean_interval((ranks < 10).astype(np.float64)),
               "generation": {k: gen.get(k) for k in ("distinct_items", "top_titles", "top_share", "entropy_bits",
                                                      "popularity_generated", "popularity_target", "in_history",
                                                      "validity", "decoding")},
               "eval_seconds": metrics.get("seconds", {}).get("eval")}
        if base is None:
            base = (name, per_case)
        elif len(per_case) != len(base[1]):
            raise SystemExit(f"{name}: {len(per_case)} test cases, {base[0]} has {len(base[1])}: not the same cases")
        else:
            difference = per_case - base[1]
            row[f"minus_{base[0]}"] = {"ndcg@10": float(difference.mean()), "ci": mean_interval(difference),
                                       "better": int((difference > 0).sum()), "worse": int((difference < 0).sum())}
        rows[name] = row
    atomic_write_json(Path(args.results), {"command": "bench/compare_runs.py " + " ".join(args.runs), "runs": rows})
    print(f"| run | NDCG@10 [95% CI] | HR@10 [95% CI] | distinct first items / cases | most returned (share) | "
          f"pop. pct first / target | − {base[0]} [paired 95% CI] (better / worse) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        g, d = r["generation"], r.get(f"minus_{base[0]}")
        top = f"{g['top_titles'][0][0]} ({g['top_share']:.3f})" if g.get("top_titles") else "–"
        pop = (f"{g['popularity_generated']:.2f} / {g['popularity_target']:.2f}"
               if g.get("popularity_generated") is not None else "–")
        paired = f"{d['ndcg@10']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] ({d['better']} / {d['worse']})" if d else "–"
        print(f"| {name} | {r['ndcg@10']:.4f} [{r['ndcg@10_ci'][0]:.4f}, {r['ndcg@10_ci'][1]:.4f}] | "
              f"{r['hr@10']:.3f} [{r['hr@10_ci'][0]:.3f}, {r['hr@10_ci'][1]:.3f}] | {g.get('distinct_items')} / "
              f"{r['cases']} | {top} | {pop} | {paired} |")


if __name__ == "__main__":
    main()
