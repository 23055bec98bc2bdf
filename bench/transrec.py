"""Benchmark: TransRec on ML-100K next to BIGRec's table, and the speed of its identifier index and decoding.

    # index build and per-step allowed-token query at 1.7k (ML-100K) / 100k / 1M items (synthetic titles)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/transrec.py speed [--sizes 1682,100000,1000000]
    # constrained vs unconstrained beam search, same prompts and beams (embedded SmolLM2)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/transrec.py decode [--prompts 8 --beams 4]
    # quality: `recalign run transrec` on BIGRec's samples (same test cases), 95% bootstrap intervals,
    # Pop on the same cases (paired), BIGRec's published numbers (unpaired: its per-case ranks were not kept)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/transrec.py quality --shots 128 --test 200 --valid 50 --beams 4

Index build peers, timed in the same process on the same token arrays:
- `pydivsufsort` (ours, `recalign.eval.token_index`): libdivsufsort over the tokens as big-endian 2-byte
  symbols, the aligned suffixes kept, then the first-column / bigram tables;
- `numpy doubling`: a vectorised prefix-doubling suffix array (lexsort per round) -- the pure-numpy candidate.
The Rust `fm-index` crate has no Python binding on PyPI (`pip index versions fm-index` / `fmindex` find
nothing), so it is not a candidate here.
Writes bench/results/transrec-{speed,decode,quality}.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    import torch

    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        pass
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _write(name: str, data: dict) -> Path:
    from recalign.io import atomic_write_json

    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path


# ------------------------------------------------------------------------------------------- corpora
def identifier_corpus(ds, tokenizer):
    from recalign.llm.constrained import IdentifierCorpus
    from recalign.methods import get_method
    from recalign.tasks.identifiers import facet_texts

    facets = get_method("transrec").defaults["facets"]
    return IdentifierCorpus(facet_texts(ds, facets["use"], facets["markers"]), tokenizer, facets["markers"],
                            [str(r) for r in ds.items["raw_id"]])


def ml100k_docs():
    from recalign.data import load_dataset
    from recalign.llm import load_tokenizer

    ds = load_dataset("ml-100k")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    return identifier_corpus(ds, tokenizer).docs, tokenizer, ds


def synthetic_docs(n: int, tokenizer, ds, seed: int = 0) -> list[np.ndarray]:
    """n items written like ML-100K's documents: ` || {id} ##`, 1-3 genres ` ## G @@`, a title of 1-6 words
    drawn from ML-100K's title words + a year. Built from pre-tokenised pieces (the tokenizer splits at the
    spaces before words, digits are single tokens), checked against the tokenizer on a sample."""
    rng = np.random.default_rng(seed)
    tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    words = sorted({w for t in ds.items["title"] for w in str(t).split()})
    word_ids = [np.asarray(tok(" " + w), np.int32) for w in words]
    genres = sorted({g for cats in ds.items["categories"] for g in cats})
    genre_ids = [np.asarray(tok(f" ## {g} @@"), np.int32) for g in genres]
    space, digits = tok(" 1")[0], {str(d): tok(" " + str(d))[1] for d in range(10)}
    open_id, close_id = tok(" ||"), tok(" ##")
    years = [np.asarray(tok(f" ({y})"), np.int32) for y in range(1920, 2000)]
    docs = []
    for i in range(n):
        parts = [np.asarray(open_id + [space] + [digits[c] for c in str(i + 1)] + close_id, np.int32)]
        parts += [genre_ids[g] for g in rng.choice(len(genres), size=rng.integers(1, 4), replace=False)]
        parts += [word_ids[w] for w in rng.integers(len(words), size=rng.integers(1, 7))]
        parts.append(years[rng.integers(len(years))])
        docs.append(np.concatenate(parts))
    for i in rng.choice(n, size=min(n, 200), replace=False):  # the pieces tokenise like the whole text
        assert docs[i].tolist() == tok(tokenizer.decode(docs[i].tolist())), i
    return docs


def numpy_doubling_sa(text: np.ndarray) -> np.ndarray:
    """Suffix array by prefix doubling, vectorised with numpy (the pure-numpy peer)."""
    n = len(text)
    rank = text.astype(np.int64)
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)
        second[:n - k] = rank[k:]
        sa = np.lexsort((second, rank))
        r, s = rank[sa], second[sa]
        new = np.concatenate([[0], np.cumsum((r[1:] != r[:-1]) | (s[1:] != s[:-1]))])
        rank = np.empty(n, dtype=np.int64)
        rank[sa] = new
        if new[-1] == n - 1 or k >= n:
            return sa
        k *= 2


def speed(args) -> dict:
    from recalign.eval.token_index import TokenIndex

    docs_ml, tokenizer, ds = ml100k_docs()
    eos = tokenizer.eos_token_id
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        started = time.perf_counter()
        docs = docs_ml if n == len(docs_ml) else synthetic_docs(n, tokenizer, ds)
        make_seconds = time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        index = TokenIndex.build(docs, eos)
        build, build_cpu = time.perf_counter() - started, time.process_time() - cpu
        n_tokens = index.n_tokens
        peer = peer_cpu = None
        if n_tokens <= args.numpy_max_tokens:
            started, cpu = time.perf_counter(), time.process_time()
            sa = numpy_doubling_sa(index.text[:-1])
            peer, peer_cpu = time.perf_counter() - started, time.process_time() - cpu
            assert np.array_equal(sa, index.sa), "numpy doubling and divsufsort disagree"
            del sa
        # beam-like queries: a random document, a random start, 1-8 tokens; cold cache (first query of a
        # prefix) and the beam's next step (extending a cached prefix by one token)
        rng = np.random.default_rng(1)
        patterns = []
        for _ in range(args.queries):
            d = index.doc(int(rng.integers(index.n_docs))).tolist()
            i = int(rng.integers(len(d)))
            patterns.append(d[i:i + int(rng.integers(1, 9))])
        # per-query times are this thread's CPU time: on a shared machine the wall time of a sub-millisecond
        # call is mostly waiting for a core (the wall-clock percentiles are kept too)
        index._cache.clear()
        cold, step, cold_wall = [], [], []
        for p in patterns:
            t0, w0 = time.thread_time(), time.perf_counter()
            tokens, _ = index.next_tokens(p)
            cold.append(time.thread_time() - t0)
            cold_wall.append(time.perf_counter() - w0)
            nxt = [t for t in tokens.tolist() if t != eos]
            if nxt:
                t0 = time.thread_time()
                index.next_tokens(p + [nxt[0]])
                step.append(time.thread_time() - t0)
        # the plain vectorised peer: range by binary search, then gather the whole range's next column
        gather = []
        for p in patterns[:min(len(patterns), 500)]:
            t0 = time.thread_time()
            lo, hi = index.range(p)
            np.unique(index.text[index.sa[lo:hi].astype(np.int64) + len(p)], return_counts=True)
            gather.append(time.thread_time() - t0)
        size = sum(a.nbytes for a in (index.text, index.sa, index.uni_tokens, index.uni_counts,
                                      index.bi_offsets, index.bi_tokens, index.bi_counts, index.starts))
        size += sum(a.nbytes + b.nbytes for a, b in index.wide.values())

        def us(values, q):
            return float(np.percentile(values, q) * 1e6) if values else None

        row = {"items": n, "tokens": n_tokens, "make_docs_s": make_seconds, "build_s": build,
               "build_cpu_s": build_cpu, "numpy_doubling_s": peer, "numpy_doubling_cpu_s": peer_cpu,
               "index_mb": size / 2**20, "wide_patterns": len(index.wide),
               "cold_us": {q: us(cold, q) for q in (50, 95, 99, 100)},
               "cold_wall_us": {q: us(cold_wall, q) for q in (50, 95, 99, 100)},
               "step_us": {q: us(step, q) for q in (50, 95, 99, 100)},
               "gather_us": {q: us(gather, q) for q in (50, 95, 99, 100)}, "queries": len(patterns)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del index, docs
    out = {"machine": machine(), "command": " ".join(sys.argv), "rows": rows}
    _write("transrec-speed.json", out)
    print("\n| items | corpus tokens | build wall / CPU (s) | numpy doubling wall / CPU (s) | index MB | "
          "step query p50 / p99 (us CPU) | cold query p50 / p99 (us CPU) | gather-range peer p50 / p99 (us CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peer = (f"{r['numpy_doubling_s']:.2f} / {r['numpy_doubling_cpu_s']:.2f}" if r["numpy_doubling_s"] is not None
                else "–")
        print(f"| {r['items']:,} | {r['tokens']:,} | {r['build_s']:.2f} / {r['build_cpu_s']:.2f} | {peer} | "
              f"{r['index_mb']:.0f} | "
              f"{r['step_us'][50]:.0f} / {r['step_us'][99]:.0f} | {r['cold_us'][50]:.0f} / {r['cold_us'][99]:.0f} | "
              f"{r['gather_us'][50]:.0f} / {r['gather_us'][99]:.0f} |")
    return out


# ------------------------------------------------------------------------------------------ decoding
def decode(args) -> dict:
    from recalign.data import load_dataset
    from recalign.eval.token_index import TokenIndex
    from recalign.llm import Backbone, Prompter
    from recalign.llm.constrained import FacetRule, IndexConstraint
    from recalign.methods import get_method
    from recalign.tasks.identifiers import history_texts
    from recalign.tasks.next_item import generative_samples
    from recalign.tasks.text import frame_fields

    ds = load_dataset("ml-100k")
    backbone = Backbone.load(args.model)
    defaults = get_method("transrec").defaults
    index = TokenIndex.build(identifier_corpus(ds, backbone.tokenizer).docs, backbone.tokenizer.eos_token_id)
    _, _, test = generative_samples(ds, {**defaults["samples"], "test_size": args.prompts})
    p = defaults["prompt"]
    prompter = Prompter(p["title"], backbone.tokenizer, p["wrapper"], p["system"], p["max_tokens"], backbone.count_tokens)
    prompts = prompter.render_all(frame_fields(test, history_texts(ds)["title"], "movie", with_target=False,
                                               with_labels=False))  # the title facet's prompts
    backbone.generate(prompts[:1], num_beams=2, max_new_tokens=2)  # warm-up
    out = {"machine": machine(), "command": " ".join(sys.argv), "prompts": len(prompts), "beams": args.beams,
           "max_new_tokens": args.max_new_tokens, "runs": []}
    for repeat in range(args.repeats):
        for mode in ("unconstrained", "constrained"):
            processor = None
            inside = [0.0]
            if mode == "constrained":
                processor = IndexConstraint(index, backbone.tokenizer.eos_token_id, FacetRule(), backbone.pad_id)
            timed = _Timed(processor, inside)  # without a processor: only counts the decoding steps
            started = time.perf_counter()
            gen = backbone.generate(prompts, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                                    batch_size=len(prompts), length_penalty=0.0, logits_processor=timed)
            seconds = time.perf_counter() - started
            lengths = [len(t) for row in gen.token_ids for t in row]
            valid = (sum(index.count(t) > 0 for row in gen.token_ids for t in row if t) / max(1, len(lengths)))
            run = {"repeat": repeat, "mode": mode, "seconds": seconds, "processor_seconds": inside[0],
                   "steps": timed.calls, "seconds_per_step": seconds / max(1, timed.calls),
                   "mean_new_tokens": float(np.mean(lengths)), "in_corpus": valid}
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
    _write("transrec-decode.json", out)
    by = {m: [r for r in out["runs"] if r["mode"] == m] for m in ("unconstrained", "constrained")}
    print("\n| mode | seconds (median of repeats) | decoding steps | seconds per step | in the processor (s) | "
          "mean new tokens per beam | beams in the corpus |")
    print("|---|---|---|---|---|---|---|")
    for m, runs in by.items():
        print(f"| {m} | {statistics.median(r['seconds'] for r in runs):.1f} | "
              f"{statistics.median(r['steps'] for r in runs):g} | "
              f"{statistics.median(r['seconds_per_step'] for r in runs):.2f} | "
              f"{statistics.median(r['processor_seconds'] for r in runs):.2f} | "
              f"{statistics.median(r['mean_new_tokens'] for r in runs):.1f} | "
              f"{statistics.median(r['in_corpus'] for r in runs):.2f} |")
    return out


class _Timed:
    """A LogitsProcessor that times another one (or, without one, passes the scores through) and counts the
    decoding steps."""

    def __init__(self, inner, total):
        self.inner, self.total, self.calls = inner, total, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.inner is None:
            return scores
        t0 = time.perf_counter()
        result = self.inner(input_ids, scores)
        self.total[0] += time.perf_counter() - t0
        return result


# ------------------------------------------------------------------------------------------- quality
BIGREC_DOC = "docs/benchmarks-bigrec.md"
# BIGRec (1,024 shots) on the same 200 test cases, from docs/benchmarks-bigrec.md: hits at 0-based ranks 0 and 3
BIGREC_HIT_RANKS = [0, 3]


def bootstrap(values: np.ndarray) -> list[float]:
    """95% percentile-bootstrap interval of the mean of per-case values (`recalign.eval.intervals`)."""
    from recalign.eval.intervals import mean_interval

    return mean_interval(values)


def per_case(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    from recalign.eval.metrics import ndcg_per_case

    return {f"ndcg@{k}": ndcg_per_case(ranks, k), f"recall@{k}": (ranks < k).astype(float)}


def difference_interval(a: np.ndarray, b: np.ndarray, paired: bool, draws: int = 4000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    if paired:
        idx = rng.integers(len(a), size=(draws, len(a)))
        diffs = a[idx].mean(1) - b[idx].mean(1)
    else:
        diffs = (a[rng.integers(len(a), size=(draws, len(a)))].mean(1)
                 - b[rng.integers(len(b), size=(draws, len(b)))].mean(1))
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def cf_ranks(ds, samples_cfg: dict, shots: int, seed: int, minutes: float) -> dict[str, np.ndarray]:
    """Pop (all) and SASRec (the run's `shots` samples; all training-period interactions): 0-based target ranks
    on the run's test cases, each user's earlier items masked (as in docs/benchmarks-bigrec.md: default
    hyper-parameters, early stopping on NDCG@10 of the valid cases, at most `minutes` of training)."""
    import torch

    from recalign.cf import train_cf_model
    from recalign.cf.evaluate import score_cases
    from recalign.data import few_shot
    from recalign.eval import target_ranks
    from recalign.eval.grounding import popularity_counts
    from recalign.methods import get_method
    from recalign.tasks.next_item import Cases, full_histories, generative_samples, history_mask

    split, valid, test = generative_samples(ds, samples_cfg)
    period = ds.interactions[ds.interactions["timestamp"] <= split.train["timestamp"].max()]
    pop = popularity_counts(period["item"].to_numpy(), ds.n_items).float()
    scores = pop.expand(len(test), -1).clone()
    mask = history_mask(full_histories(ds, test), ds.n_items)
    targets = torch.from_numpy(test["item"].to_numpy(np.int64).copy())
    out = {"pop (all)": target_ranks(scores, targets, mask).numpy()}
    if minutes <= 0:
        return out
    cases = {name: Cases(frame["user"].to_numpy(np.int64), full_histories(ds, frame), frame["item"].to_numpy(np.int64))
             for name, frame in (("valid", valid), ("test", test))}
    defaults = get_method("sasrec").defaults
    config = {"model": dict(defaults.get("model", {})), "train": {**defaults.get("train", {}), "max_minutes": minutes}}
    train_sets = {f"sasrec ({shots} samples)": few_shot(split.train, shots, seed), "sasrec (all)": period}
    for label, data in train_sets.items():
        started = time.perf_counter()
        model = train_cf_model("sasrec", data, config, catalog=ds, valid=cases["valid"], seed=seed)
        ranks = [target_ranks(sc, torch.from_numpy(cases["test"].targets[rows]), m)
                 for rows, sc, m in score_cases(model, cases["test"])]
        out[label] = torch.cat(ranks).numpy()
        print(f"{label}: {len(data):,} rows, trained in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return out


def bigrec_ranks(args) -> tuple[np.ndarray, dict]:
    """BIGRec (`recalign run bigrec`) on the same shots and test cases, no injection: its per-case ranks
    (paired with TransRec's) and its generation statistics."""
    from recalign.runner import run_method

    out = Path(f"{args.out}-bigrec")
    sets = [f"model.name={args.model}", f"train.shots={args.shots}", f"train.epochs={args.epochs}",
            "train.valid_loss_size=0", f"samples.valid_size={args.bigrec_valid}", f"samples.test_size={args.test}",
            f"generate.beams={args.beams}", f"seed={args.seed}", "inject.popularity=false",
            "inject.collaborative=false"]
    metrics = run_method("bigrec", "ml-100k", out, sets=sets, resume=True)
    cases = json.loads((out / "cases-test.json").read_text())
    return np.asarray([c["rank"] for c in cases], dtype=np.float64), {
        "run_dir": str(out), "sets": sets, "seconds": metrics.get("seconds"), "generation": metrics.get("generation"),
        "distinct_generations": len({c["generated"] for c in cases})}


def title_generations(cases: list[dict]) -> dict:
    """How the top title beams look: distinct texts, the most frequent, and the share that is a year span
    ("(1996)", "The (1996)": a stopword and/or a year only)."""
    from collections import Counter

    from recalign.tasks.identifiers import SPAN_STOPWORDS, YEAR

    texts = [c["generated"]["title"]["text"] for c in cases if "title" in c.get("generated", {})]
    year_only = [all(w.casefold() in SPAN_STOPWORDS or YEAR.fullmatch(w) or YEAR.match(w) for w in t.split())
                 for t in texts]
    return {"beams": len(texts), "distinct": len(set(texts)), "year_or_stopword_only": float(np.mean(year_only)),
            "most_common": Counter(texts).most_common(8)}


def quality(args) -> dict:
    from recalign.data import load_dataset
    from recalign.methods import get_method
    from recalign.runner import run_method

    out_dir = Path(args.out)
    sets = [f"model.name={args.model}", f"train.shots={args.shots}", f"train.epochs={args.epochs}",
            f"train.valid_loss_size={args.valid_loss}", f"samples.valid_size={args.valid}",
            f"samples.test_size={args.test}", f"generate.beams={args.beams}", f"seed={args.seed}",
            f"grounding.select_on_valid={'true' if args.valid else 'false'}"] + list(args.set or [])
    started = time.perf_counter()
    metrics = run_method("transrec", "ml-100k", out_dir, sets=sets, resume=True)
    wall = time.perf_counter() - started
    metrics = json.loads((out_dir / "metrics.json").read_text())
    cases = json.loads((out_dir / "cases-test.json").read_text())
    ds = load_dataset("ml-100k")
    samples_cfg = {**get_method("transrec").defaults["samples"], "valid_size": args.valid, "test_size": args.test}
    key = {"shots": args.shots, "seed": args.seed, "valid": args.valid, "test": args.test, "cf_minutes": args.cf_minutes}
    cached = RESULTS / "transrec-baselines.json"  # one SASRec training serves every run on the same cases
    earlier = json.loads(cached.read_text()) if cached.is_file() else {}
    if earlier.get("key") == key:
        baselines = {k: np.asarray(v, dtype=np.float64) for k, v in earlier["ranks"].items()}
    else:
        baselines = cf_ranks(ds, samples_cfg, args.shots, args.seed, args.cf_minutes)
        _write(cached.name, {"key": key, "machine": machine(),
                             "ranks": {k: [float(r) for r in v] for k, v in baselines.items()}})
    bigrec_info = None
    if args.bigrec_valid:
        bigrec, bigrec_info = bigrec_ranks(args)
        baselines = {**baselines, f"bigrec ({args.shots} samples)": bigrec}
    pop = baselines["pop (all)"]
    n = len(cases)
    assert all(len(r) == n for r in baselines.values())
    ranks_of = {k: np.asarray([c[k] for c in cases]) for k in cases[0] if k.startswith("rank")}
    ranks_of.update(baselines)
    table = {}
    for name, ranks in ranks_of.items():
        row = {}
        for k in (5, 10, 20):
            for metric, values in per_case(ranks, k).items():
                row[metric] = {"value": float(values.mean()), "ci95": bootstrap(values)}
        table[name] = row
    # BIGRec's published run used exactly these 200 test cases (samples.test_size 200, subset_seed 0)
    same_cases = n == 200 and args.samples_match_bigrec
    bigrec = np.full(n, np.inf)
    bigrec[:len(BIGREC_HIT_RANKS)] = BIGREC_HIT_RANKS
    compare = {}
    for k in (5, 10):
        ours = per_case(np.asarray([c["rank"] for c in cases]), k)
        theirs = per_case(bigrec, k)
        popk = per_case(pop, k)
        for metric in ours:
            compare[metric] = {"transrec": float(ours[metric].mean()), "pop": float(popk[metric].mean()),
                               "transrec_minus_pop_ci95_paired": difference_interval(ours[metric], popk[metric],
                                                                                     True)}
            for label, ranks in baselines.items():
                if label.startswith(("sasrec", "bigrec")):
                    theirs_k = per_case(ranks, k)[metric]
                    compare[metric][label] = float(theirs_k.mean())
                    compare[metric][f"transrec_minus_{label}_ci95_paired"] = difference_interval(
                        ours[metric], theirs_k, True)
            if same_cases:
                compare[metric].update({
                    "bigrec": float(theirs[metric].mean()),
                    "transrec_minus_bigrec_ci95_unpaired": difference_interval(ours[metric], theirs[metric],
                                                                               False)})
    groups = {}
    for g in ("warm", "cold", "dense", "sparse"):
        ranks = np.asarray([c["rank"] for c in cases if g in c["groups"]])
        if len(ranks):
            vals = per_case(ranks, 10)
            groups[g] = {"cases": int(len(ranks)), **{m: {"value": float(v.mean()), "ci95": bootstrap(v)}
                                                     for m, v in vals.items()}}
    result = {"machine": machine(), "command": " ".join(sys.argv), "args": vars(args), "sets": sets,
              "wall_seconds": wall, "test_cases": n, "table": table, "compare": compare, "groups": groups,
              "metrics": {k: metrics.get(k) for k in ("test", "valid", "seconds", "validity", "generation",
                                                      "answers_in_index", "samples", "index", "train_summary",
                                                      "groups")},
              "variants": {k: {kk: vv for kk, vv in v.items() if kk != "grid"} for k, v in metrics["variants"].items()},
              "grid": next((v["grid"] for v in metrics["variants"].values() if "grid" in v), None),
              "title_generations": title_generations(cases), "bigrec_same_shots": bigrec_info,
              "per_case_ranks": {k: [float(r) for r in v] for k, v in ranks_of.items()}}
    _write(args.json, result)
    print(f"\n{n} test cases; wall {wall / 60:.1f} min; title beams: {result['title_generations']}")
    print("| ranking | NDCG@10 | HR@10 | NDCG@20 | HR@20 | hits@10 |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        cells = [f"{row[m]['value']:.4f} [{row[m]['ci95'][0]:.4f}, {row[m]['ci95'][1]:.4f}]"
                 for m in ("ndcg@10", "recall@10", "ndcg@20", "recall@20")] + [f"{row['recall@10']['value'] * n:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for metric, c in compare.items():
        ci = lambda v: f"[{v[0]:+.4f}, {v[1]:+.4f}]"  # noqa: E731
        others = "; ".join(f"vs {label[len('transrec_minus_'):-len('_ci95_paired')]} (paired) {ci(v)}"
                           for label, v in c.items() if label.startswith("transrec_minus_")
                           and label.endswith("_ci95_paired"))
        vs_bigrec = (f"; vs BIGRec {c['bigrec']:.4f} (unpaired) {ci(c['transrec_minus_bigrec_ci95_unpaired'])}"
                     if "bigrec" in c else "")
        print(f"{metric}: TransRec {c['transrec']:.4f}, difference 95% CI {others}{vs_bigrec}")
    return result


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"),
                        help="where the JSON results go (default: bench/results, the committed evidence the docs cite; "
                             "a trial or smaller run belongs elsewhere)")
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--sizes", default="1682,100000,1000000")
    s.add_argument("--queries", type=int, default=2000)
    s.add_argument("--numpy-max-tokens", type=int, default=3_000_000, help="skip the numpy peer above this")
    d = sub.add_parser("decode")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--prompts", type=int, default=8)
    d.add_argument("--beams", type=int, default=4)
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--repeats", type=int, default=2)
    q = sub.add_parser("quality")
    q.add_argument("--model", default="smollm2-135m-instruct")
    q.add_argument("--shots", type=int, default=128)
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--valid", type=int, default=50)
    q.add_argument("--valid-loss", type=int, default=0)
    q.add_argument("--test", type=int, default=200)
    q.add_argument("--beams", type=int, default=4)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=str(ROOT / "runs" / "bench-transrec"))
    q.add_argument("--set", action="append", help="extra --set overrides for the run")
    q.add_argument("--cf-minutes", type=float, default=3.0,
                   help="train SASRec on the shots and on all data for at most this long each (0: Pop only)")
    q.add_argument("--bigrec-valid", type=int, default=0,
                   help="also run BIGRec on the same shots and test cases with this many valid cases (0: not run)")
    q.add_argument("--json", default="transrec-quality.json", help="results file name under bench/results/")
    q.add_argument("--samples-match-bigrec", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with BIGRec's published 200 cases (only with --test 200 and default samples.*)")
    args = parser.parse_args()
    RESULTS = Path(args.results_dir)
    {"speed": speed, "decode": decode, "quality": quality}[args.part](args)


if __name__ == "__main__":
    main()
