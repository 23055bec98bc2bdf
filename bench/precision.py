"""Benchmark: the same trained TALLRec adapter scored in float32, bfloat16 and int8 (`model.quantize: int8`) on
the same test samples: AUC / UAUC per number format with 95% intervals, the difference to float32 (paired 95%
intervals over the same samples), the largest score difference,
the rank correlation of the scores, and the scoring speed.

The run directory gives the config (model, prompt, samples) and the adapter (`checkpoints/adapter-seed0`);
`--test-size` overrides how many test samples are drawn (the subset seed stays the run's).

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/precision.py --run runs/quick/tallrec
        [--test-size 2000] [--formats float32,bfloat16,int8] [--adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "precision.json"
FORMATS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("float32", "int8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished TALLRec run directory")
    parser.add_argument("--adapter", default=None, help="default: RUN/checkpoints/adapter-seed0")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--formats", default="float32,bfloat16,int8")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("RECALIGN_THREADS", "2")))
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--scores-dir", default=None,
                        help="keep each format's scores here (FORMAT.npy) and reuse those already there, so that "
                             "formats can be scored by separate processes and tabled by a last one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    from recalign.data import load_dataset
    from recalign.io import atomic_write_json
    from recalign.llm import Backbone, Prompter
    from recalign.llm.precision import cpu_info
    from recalign.report.markdown import signed_span
    from recalign.report.summary import with_intervals
    from recalign.tasks.ctr import ctr_report, paired_ctr_report, tallrec_protocol
    from recalign.tasks.text import frame_fields

    run = Path(args.run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    adapter = Path(args.adapter) if args.adapter else run / "checkpoints" / "adapter-seed0"
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: unknown {', '.join(unknown)}; use {', '.join(FORMATS)}")
    data_cfg = cfg["data"]
    metrics_file = run / "metrics.json"
    dataset = json.loads(metrics_file.read_text()).get("dataset", "ml-100k") if metrics_file.is_file() else "ml-100k"
    ds = load_dataset(dataset, fmt=data_cfg.get("format"), like_threshold=data_cfg.get("like_threshold"),
                      k_core_users=data_cfg.get("k_core_users", 0), k_core_items=data_cfg.get("k_core_items", 0),
                      domain=data_cfg.get("domain"))
    data = tallrec_protocol(ds, {**cfg["samples"], "test_size": args.test_size})
    frame = data.test
    prompt_cfg = cfg["prompt"]
    noun = data_cfg.get("domain") or ds.domain

    rows, scores = [], {}
    kept = Path(args.scores_dir) if args.scores_dir else None
    for name in formats:
        if kept is not None and (kept / f"{name}.npy").is_file():
            saved = json.loads((kept / f"{name}.json").read_text())
            scores[name] = np.load(kept / f"{name}.npy")
            if len(scores[name]) != len(frame):
                raise SystemExit(f"{kept / name}.npy holds {len(scores[name])} scores, not {len(frame)}")
            metrics = ctr_report(frame, scores[name])
            rows.append({**saved, "format": name, **{k: metrics[k] for k in ("auc", "uauc", "auc_ci", "uauc_ci")}})
            print(f"{name}: read back from {kept}", flush=True)
            continue
        dtype, quantize = FORMATS[name]
        backbone = Backbone.load(cfg["model"]["name"], dtype=dtype, quantize=quantize,
                                 batch_size=int(cfg["model"]["batch_size"]), prefix_cache=cfg["model"]["prefix_cache"])
        backbone.load_adapter(adapter)
        prompter = Prompter(prompt_cfg, backbone.tokenizer, prompt_cfg["wrapper"], prompt_cfg["system"],
                            prompt_cfg["max_tokens"], backbone.count_tokens)
        prompts = prompter.render_all(frame_fields(frame, ds.titles(), noun))
        started = time.perf_counter()
        scores[name] = backbone.score_yes_no(prompts, prompt_cfg["yes"], prompt_cfg["no"], progress=name).numpy()
        seconds = time.perf_counter() - started
        metrics = ctr_report(frame, scores[name])
        rows.append({"format": name, **{k: metrics[k] for k in ("auc", "uauc", "auc_ci", "uauc_ci")}, "seconds": seconds,
                     "samples_per_s": len(prompts) / seconds, "precision": backbone.precision})
        if kept is not None:
            kept.mkdir(parents=True, exist_ok=True)
            np.save(kept / f"{name}.npy", scores[name])
            atomic_write_json(kept / f"{name}.json", {k: v for k, v in rows[-1].items() if not k.startswith(("auc", "uauc"))})
        print(f"{name}: AUC {metrics['auc']:.4f} UAUC {metrics['uauc']:.4f}, {len(prompts) / seconds:.2f} samples/s",
              flush=True)
        del backbone

    base = "float32" if "float32" in scores else formats[0]
    for row in rows:
        other = scores[row["format"]]
        paired = paired_ctr_report(frame, other, scores[base])
        row["auc_diff_vs_" + base], row["auc_diff_ci"] = paired["auc"]["difference"], paired["auc"]["ci"]
        row["uauc_diff_vs_" + base], row["uauc_diff_ci"] = paired["uauc"]["difference"], paired["uauc"]["ci"]
        row["max_abs_score_diff"] = float(np.abs(other - scores[base]).max())
        row["score_spearman"] = float(spearmanr(other, scores[base]).statistic)

    print()
    print(f"{len(frame)} test samples, adapter {adapter}")
    print(f"| format | AUC [95% CI] | AUC - {base} [paired 95% CI] | UAUC [95% CI] | UAUC - {base} [paired 95% CI] | "
          f"max abs score diff | Spearman vs {base} | samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        shown = with_intervals(row, ["auc", "uauc"])
        print(f"| {row['format']} | {shown['auc']} | {row['auc_diff_vs_' + base]:+.4f} "
              f"{signed_span(row['auc_diff_ci'])} | {shown['uauc']} | "
              f"{row['uauc_diff_vs_' + base]:+.4f} {signed_span(row['uauc_diff_ci'])} | {row['max_abs_score_diff']:.3f} | "
              f"{row['score_spearman']:.4f} | {row['samples_per_s']:.2f} |")
    atomic_write_json(Path(args.results), {
        "machine": {"cpu": cpu_info()[0], "cpus": os.cpu_count(), "threads": args.threads,
                    "platform": platform.platform(), "torch": torch.__version__},
        "run": str(run), "adapter": str(adapter), "test_samples": len(frame), "rows": rows,
    })
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
