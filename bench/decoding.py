"""Benchmark: BIGRec's decoding options side by side (issue #16) on ML-100K with the embedded SmolLM2-135M.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 .venv/bin/python bench/decoding.py [--shots 128 --valid 32 --test 64
        --beams 4 --variants d3,d3+sasrec,sample --weights 0,1,2 --out runs/bench-decoding]

`beam` is a full `recalign run bigrec` (the shipped pipeline: LoRA tuning on N shots, beam search, grounding).
The other variants reuse that run's adapter, prompts, catalogue embeddings and valid/test cases (one LoRA
training for all; LoRA tuning of 128 shots costs ~10 min on the shared CPU) and run `llm.generate_step`
with their `generate.decoding` keys, then the same grounding and metrics from public layers; the script checks
that this composition reproduces the beam run's own NDCG@10 from its generations before it trusts it.
- `d3`: ghost-aware length normalisation (ghost_threshold 0.9), unconstrained;
- `d3+sasrec`: D3 with the text-free assistant (SASRec on every training-period interaction, as BIGRec's
  `inject.cf_data: all`), answers constrained to catalogue titles, weight chosen on the valid cases by NDCG@10
  (`--weights`; weight 0 = D3 on the title trie without assistant);
- `sample`: temperature 1 / top-p 0.9, 8 samples per case merged by frequency.
Reference rows on the same test cases (full histories masked): Pop and SASRec on the same N shots, and the
assistant's SASRec (all training-period interactions) on its own.
Writes bench/results/bigrec-decoding.json (or `--results`) after every row and prints a Markdown table (NDCG@10 / HR@10 with 95% bootstrap
intervals from `recalign.eval.intervals`, and the generation diagnostics).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg_at_start": load}



def beam_run(args) -> tuple[Path, dict]:
    """The baseline: `recalign run bigrec` with today's beam search (trains the adapter the others reuse)."""
    from recalign.runner import run_method

    sets = [f"model.name={args.model}", f"train.shots={args.shots}", f"train.epochs={args.epochs}",
            "train.valid_loss_size=0", f"samples.valid_size={args.valid}", f"samples.test_size={args.test}",
            f"generate.beams={args.beams}", f"seed={args.seed}", "inject.cf_model=sasrec", "inject.cf_data=all",
            "inject.collaborative=false", f"inject.cf_train.max_minutes={args.cf_minutes}",
            "generate.decoding=beam"] + (args.set or [])
    directory = Path(args.out) / "beam"
    print("beam: recalign run bigrec --dataset ml-100k --out " + str(directory) + " "
          + " ".join(f"--set {s}" for s in sets), file=sys.stderr, flush=True)
    metrics = run_method("bigrec", "ml-100k", directory, sets=sets, resume=directory.exists())
    return directory, {"sets": sets, "metrics": metrics}


class Composed:
    """BIGRec's evaluation rebuilt from public layers around a finished run's adapter and config."""

    def __init__(self, run_dir: Path):
        import yaml

        from recalign.data import load_dataset
        from recalign.eval.grounding import CatalogueCache, model_fingerprint, popularity_counts
        from recalign.llm import Backbone, Prompter, fill
        from recalign.tasks.next_item import Cases, full_histories, generative_samples, history_mask
        from recalign.tasks.text import frame_fields
        from recalign import assets

        self.run_dir = run_dir
        self.cfg = cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        self.ds = ds = load_dataset("ml-100k")
        self.titles = titles = ds.titles()
        self.split, valid, test = generative_samples(ds, cfg["samples"])
        self.frames = {"valid": valid, "test": test}
        self.histories = {n: full_histories(ds, f) for n, f in self.frames.items()}
        self.cases = {n: Cases(f["user"].to_numpy(np.int64), self.histories[n], f["item"].to_numpy(np.int64))
                      for n, f in self.frames.items()}
        self.targets = {n: torch.from_numpy(f["item"].to_numpy(np.int64).copy()) for n, f in self.frames.items()}
        self.masks = {n: history_mask(h, ds.n_items) for n, h in self.histories.items()}
        cutoff = self.split.train["timestamp"].max()
        self.period = ds.interactions[ds.interactions["timestamp"] <= cutoff]
        self.popularity = popularity_counts(self.period["item"].to_numpy(), ds.n_items).numpy()
        self.backbone = backbone = Backbone.from_config(cfg["model"])
        g = cfg["grounding"]
        base_id = model_fingerprint(backbone.causal_lm, cfg["model"]["name"])
        texts = [fill(g["item_text"], "grounding.item_text", title=t) for t in titles]
        cache = CatalogueCache(g["cache_dir"] or (assets.home() / "grounding"))
        self.catalogue, _ = cache.get(texts, lambda batch: backbone.embed(
            batch, pooling=g["pooling"], batch_size=int(g["batch_size"]), adapter=False), base_id,
            extra=f"pooling={g['pooling']}")
        backbone.load_adapter(run_dir / "checkpoints" / "adapter")
        p = cfg["prompt"]
        prompter = Prompter(p, backbone.tokenizer, p["wrapper"], p["system"], p["max_tokens"], backbone.count_tokens)
        noun = cfg["data"].get("domain") or ds.domain or "item"
        self.prompts = {n: prompter.render_all(frame_fields(f, titles, noun, with_target=False, with_labels=False))
                        for n, f in self.frames.items()}
        self.answers = [fill(p["output"], "prompt.output", title=t) for t in titles]

    def trie(self):
        from recalign.llm.decoding import TitleTrie

        return TitleTrie.from_texts(self.backbone.tokenize_piece, self.answers, self.backbone.tokenizer.eos_token_id)

    def evaluate(self, split: str, texts: list[list[str]]) -> dict:
        """Top-beam grounding (`grounding.beams: top`), NDCG@10 / HR@10 with intervals, diagnostics."""
        from collections import Counter

        from recalign.eval.grounding import clean_generation, l2_distances, normalise_title
        from recalign.eval.intervals import ranking_intervals
        from recalign.eval.metrics import ndcg_per_case, ranking_metrics, target_ranks

        g = self.cfg["grounding"]
        top = [clean_generation(row[0]) or " " for row in texts]
        flat = [clean_generation(t) or " " for row in texts for t in row]  # every beam, as BIGRec embeds them
        queries = self.backbone.embed(flat, pooling=g["pooling"], batch_size=int(g["batch_size"]), adapter=False)
        dist = l2_distances(queries, self.catalogue).view(len(texts), len(texts[0]), -1)[:, 0]
        ranks = target_ranks(-dist, self.targets[split], self.masks[split])
        out = {k: v for k, v in ranking_metrics(ranks, [10]).items() if k in ("ndcg@10", "hr@10")}
        out.update(ranking_intervals(ranks.numpy(), [10]))
        out["case_ndcg@10"] = ndcg_per_case(ranks.numpy(), 10).tolist()  # for paired differences
        out["reciprocal_rank"] = float((1.0 / (1.0 + ranks)).mean())  # the assistant's tie-break, as in BIGRec
        nearest = dist.argmin(1).numpy()
        norm = [normalise_title(t) for t in top]
        counts = Counter(norm)
        n = len(norm)
        order = np.sort(self.popularity)
        pct = (np.searchsorted(order, self.popularity, "left") + 0.5 * (
            np.searchsorted(order, self.popularity, "right") - np.searchsorted(order, self.popularity, "left"))) / len(order)
        catalogue = {normalise_title(t) for t in self.titles}
        key, count = counts.most_common(1)[0]
        out["generation"] = {
            "cases": n, "distinct_titles": len(counts), "top_share": count / n,
            "top_titles": [[top[norm.index(k)], c] for k, c in counts.most_common(5)],
            "entropy_bits": float(sum(c / n * np.log2(n / c) for c in counts.values())),
            "validity": float(np.mean([t == normalise_title(self.titles[i]) for t, i in zip(norm, nearest)])),
            "in_catalogue": float(np.mean([t in catalogue for t in norm])),
            "popularity_generated": float(pct[nearest].mean()),
            "popularity_target": float(pct[self.targets[split].numpy()].mean()),
            "in_history": float(np.mean([int(i) in set(h.tolist()) for i, h in zip(nearest, self.histories[split])])),
        }
        return out


def assistant_scores(composed: Composed, args) -> tuple[dict, dict]:
    """SASRec on every training-period interaction (BIGRec's `inject.cf_data: all`): per split the CF
    log-probabilities over items with each case's history masked, and its own test metrics."""
    from recalign.cf import evaluate_ranking, train_cf_model
    from recalign.cf.evaluate import score_cases

    model = train_cf_model("sasrec", composed.period, {"train": {"max_minutes": args.cf_minutes}},
                           catalog=composed.ds, valid=composed.cases["valid"], seed=args.seed)
    out = {}
    for name, cases in composed.cases.items():
        scores = torch.cat([s.double() for _, s, _ in score_cases(model, cases)])
        finite = torch.isfinite(scores)
        low = torch.where(finite, scores, torch.full_like(scores, float("inf"))).amin(1, keepdim=True)
        scores = torch.where(finite, scores, low.expand_as(scores)).masked_fill(composed.masks[name], float("-inf"))
        out[name] = torch.log_softmax(scores, -1)
    return out, evaluate_ranking(model, composed.cases["test"], ks=(10,), intervals=True)


def run_variants(args, composed: Composed, beam: dict, save=None) -> tuple[dict, dict]:
    """Beam's row and each variant's; `save(rows, reference)` is called after every row (partial results)."""
    from recalign.io import Checkpoints
    from recalign.llm import generate_step
    from recalign.llm.decoding import DECODING_CONFIG

    gen_cfg = composed.cfg["generate"]
    beams, max_new = int(gen_cfg["beams"]), int(gen_cfg["max_new_tokens"])
    batch = int(gen_cfg["batch_size"])
    out, reference = {}, {}
    # the composition reproduces the beam run's own numbers from its generations
    state = Checkpoints(composed.run_dir / "checkpoints").load_checkpoint("generations-test")
    check = composed.evaluate("test", state["texts"])
    run_ndcg = beam["metrics"]["test"]["ndcg@10"]
    print(f"check: composed NDCG@10 {check['ndcg@10']:.6f} vs the run's {run_ndcg:.6f}", file=sys.stderr, flush=True)
    if abs(check["ndcg@10"] - run_ndcg) > 1e-9:
        raise SystemExit("the composed evaluation does not reproduce the beam run; not measuring the others")
    out["beam"] = {**check, "seconds": beam["metrics"]["seconds"]["eval"], "decoding": {"decoding": "beam"}}
    for name in args.variants.split(","):
        store = Checkpoints(Path(args.out) / name.replace("+", "-"))
        started = time.perf_counter()
        section = dict(DECODING_CONFIG)
        kwargs = {}
        if name == "d3":
            section.update(decoding="d3")
        elif name == "sample":
            section.update(decoding="sample", samples=8, temperature=1.0, top_p=0.9)
        elif name == "d3+sasrec":
            section.update(decoding="d3", constrained=True)
            scores, reference["SASRec (all training-period interactions; the assistant)"] = assistant_scores(
                composed, args)
            trie = composed.trie()
            grid, closeness = {}, {}
            for weight in [float(w) for w in args.weights.split(",")]:
                st = generate_step(store, composed.backbone, composed.prompts["valid"], f"valid-w{weight:g}", beams,
                                   max_new, batch, decoding=section, trie=trie,
                                   assistant=scores["valid"] if weight > 0 else None, assistant_weight=weight)
                valid = composed.evaluate("valid", st["texts"])
                grid[weight], closeness[weight] = valid["ndcg@10"], valid["reciprocal_rank"]
                print(f"d3+sasrec weight {weight:g}: valid ndcg@10 {grid[weight]:.4f}, reciprocal rank "
                      f"{closeness[weight]:.4f}", file=sys.stderr, flush=True)
            chosen = max(grid, key=lambda w: (grid[w], closeness[w], -w))  # BIGRec's rule
            kwargs = dict(trie=trie, assistant=scores["test"] if chosen > 0 else None, assistant_weight=chosen)
            section["assistant_grid"] = {f"{w:g}": v for w, v in grid.items()}
            section["assistant_grid_reciprocal_rank"] = {f"{w:g}": v for w, v in closeness.items()}
            section["assistant_weight"] = chosen
        else:
            raise SystemExit(f"unknown variant {name}")
        decoding = {k: v for k, v in section.items()
                    if k not in ("assistant_grid", "assistant_grid_reciprocal_rank", "assistant_weight")}
        test_name = f"test-w{kwargs['assistant_weight']:g}" if "assistant_weight" in kwargs else "test"
        st = generate_step(store, composed.backbone, composed.prompts["test"], test_name, beams, max_new, batch,
                           decoding=decoding, seed=args.seed, **kwargs)
        timing = Path(args.out) / name.replace("+", "-") / "seconds.json"  # a resumed variant keeps its first time
        seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else time.perf_counter() - started
        timing.write_text(json.dumps({"seconds": seconds}))
        out[name] = {**composed.evaluate("test", st["texts"]), "seconds": seconds, "decoding": section}
        if save is not None:
            save(out, reference)
        print(f"{name}: ndcg@10 {out[name]['ndcg@10']:.4f} distinct {out[name]['generation']['distinct_titles']} "
              f"({out[name]['seconds']:.0f}s)", file=sys.stderr, flush=True)
    return out, reference


def reference_rows(args, composed: Composed) -> dict:
    """Pop and SASRec trained on the same few-shot samples, scored on the same test cases."""
    from recalign.cf import train_cf_model
    from recalign.cf.evaluate import case_ranks
    from recalign.data import few_shot
    from recalign.eval.intervals import ranking_with_intervals
    from recalign.eval.metrics import ndcg_per_case

    shots = few_shot(composed.split.train, args.shots, args.seed)
    out = {}
    for label, name, data in ((f"SASRec ({len(shots)} samples)", "sasrec", shots),
                              (f"Pop ({len(composed.period):,} interactions)", "pop", composed.period)):
        config = {"train": {"max_minutes": args.cf_minutes}} if name != "pop" else {}
        model = train_cf_model(name, data, config, catalog=composed.ds, valid=composed.cases["valid"], seed=args.seed)
        ranks = case_ranks(model, composed.cases["test"])
        out[label] = {**ranking_with_intervals(ranks, (10,)), "case_ndcg@10": ndcg_per_case(ranks, 10).tolist()}
        out[label]["epochs"] = model.train_summary.get("epochs") if hasattr(model, "train_summary") else None
    return out


def paired_vs_reference(variants: dict, reference: dict) -> dict:
    """Each decoding's NDCG@10 minus each reference row's that kept per-case values (the same test cases)."""
    from recalign.eval.intervals import mean_interval

    out = {}
    for label, ref in reference.items():
        if "case_ndcg@10" not in ref:
            continue
        for name, row in variants.items():
            difference = np.asarray(row["case_ndcg@10"]) - np.asarray(ref["case_ndcg@10"])
            out[f"{name} - {label}"] = {"ndcg@10_difference": float(difference.mean()),
                                        "ci": mean_interval(difference), "cases": len(difference),
                                        "cases_better": int((difference > 0).sum()),
                                        "cases_worse": int((difference < 0).sum())}
    return out


def paired_vs_beam(variants: dict) -> dict:
    """NDCG@10 of each decoding minus beam's on the same test cases, with the bootstrap interval of the mean
    per-case difference (`recalign.eval.intervals.mean_interval`)."""
    from recalign.eval.intervals import mean_interval

    beam = np.asarray(variants["beam"]["case_ndcg@10"])
    out = {}
    for name, row in variants.items():
        if name != "beam":
            difference = np.asarray(row["case_ndcg@10"]) - beam
            out[name] = {"ndcg@10_difference": float(difference.mean()), "ci": mean_interval(difference),
                         "cases": len(difference), "cases_better": int((difference > 0).sum()),
                         "cases_worse": int((difference < 0).sum())}
    return out


def _ci(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "–"


def table(result: dict) -> str:
    lines = ["| decoding | distinct titles / cases | most generated (share) | entropy (bits) | validity | "
             "pop. pct grounded / target | in history | NDCG@10 [95% CI] | HR@10 [95% CI] | "
             "NDCG@10 − beam [95% CI, paired] | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    paired = result.get("paired_vs_beam", {})
    for name, row in result.get("variants", {}).items():
        g = row["generation"]
        top = g["top_titles"][0]
        diff = paired.get(name)
        delta = f"{diff['ndcg@10_difference']:+.4f} {_ci(diff['ci'])}" if diff else "–"
        lines.append(f"| {name} | {g['distinct_titles']} / {g['cases']} | {top[0]} ({g['top_share']:.2f}) | "
                     f"{g['entropy_bits']:.2f} | {g['validity']:.3f} | {g['popularity_generated']:.2f} / "
                     f"{g['popularity_target']:.2f} | {g['in_history']:.2f} | {row['ndcg@10']:.4f} "
                     f"{_ci(row['ndcg@10_ci'])} | {row['hr@10']:.4f} {_ci(row['hr@10_ci'])} | {delta} | "
                     f"{row['seconds']:.0f} |")
    for label, metrics in result.get("reference", {}).items():
        lines.append(f"| {label} | | | | | | | {metrics['ndcg@10']:.4f} {_ci(metrics.get('ndcg@10_ci'))} | "
                     f"{metrics['hr@10']:.4f} {_ci(metrics.get('hr@10_ci'))} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--valid", type=int, default=32)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cf-minutes", type=float, default=2.0, help="cap on each CF model's training time")
    parser.add_argument("--variants", default="d3,d3+sasrec,sample")
    parser.add_argument("--weights", default="0,1,2", help="assistant weights tried on the valid cases")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-decoding"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", help="extra bigrec --set key=value for the beam run")
    parser.add_argument("--results", default=str(RESULTS / "bigrec-decoding.json"), help="results JSON to write")
    parser.add_argument("--references-only", action="store_true",
                        help="retrain only the reference rows (per-case values kept) for a finished --results file "
                             "and add each decoding's paired difference to them")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("RECALIGN_THREADS", "2")))
    os.environ.setdefault("RECALIGN_QUIET", "1")
    from recalign.io import atomic_write_json

    started = time.perf_counter()
    if args.references_only:
        path = Path(args.results)
        result = json.loads(path.read_text())
        result["reference"] = {**result["reference"], **reference_rows(args, Composed(Path(result["beam_run"]["dir"])))}
        result["paired_vs_reference"] = paired_vs_reference(result["variants"], result["reference"])
        result["references_command"] = " ".join(sys.argv)
        atomic_write_json(path, result)
        print(json.dumps(result["paired_vs_reference"], indent=1))
        return
    result = {"machine": machine(), "command": " ".join(sys.argv), "args": vars(args)}
    directory, beam = beam_run(args)
    result["beam_run"] = {"dir": str(directory), "sets": beam["sets"], "seconds": beam["metrics"]["seconds"],
                          "train_summary": beam["metrics"]["train_summary"]}
    composed = Composed(directory)
    result["reference"] = reference_rows(args, composed)
    path = Path(args.results)
    references = dict(result["reference"])

    def save(rows: dict, extra: dict) -> None:
        result.update(variants=rows, reference={**references, **extra}, paired_vs_beam=paired_vs_beam(rows),
                      paired_vs_reference=paired_vs_reference(rows, references),
                      wall_seconds=time.perf_counter() - started, loadavg_now=os.getloadavg())
        atomic_write_json(path, result)

    rows, extra = run_variants(args, composed, beam, save)
    save(rows, extra)
    print(table(result))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
