"""GPT4Rec: generate search queries, retrieve items with BM25 (Li et al., arXiv 2023).

Step 1: LoRA tuning of the backbone with the LM loss on (history titles -> the target's title), the
generative samples of BIGRec (windows of L watched items -> the next item, split by the target's time, N
few-shot samples; best epoch by the valid answer loss). The prompt follows the paper's ("Previously, the
user watched: ... In the future, the user wants to watch").
Step 2: beam search with m beams (`generate.queries`) turns each test history into m queries, best first
(`llm.trie.cached_beam_search`: each prompt run once, its KV cache shared by the beams; `generate.search:
transformers` uses `Backbone.generate`, which runs the prompt once per beam).
Step 3: a BM25 search engine (`eval.retrieval.BM25Index`, the `bm25s` package) over one text per item
(`retrieval.item_text`: title and genres by default) retrieves the top items of every query (the user's
earlier items excluded when `eval.mask_history`), and the m result lists are merged into the top-K list:
`retrieval.merge: split` is the paper's (the top K/m items of each query in beam order, duplicates skipped),
`round_robin` interleaves the lists rank by rank. The merge depends on K, so each K is evaluated with its
own K-list; an item outside the list counts as a miss.

Reported: NDCG / HR / Recall / MRR @ eval.ks with 95% bootstrap intervals on every test case (BIGRec's
cases and masking), the same with the top query alone (`variants.top_query`: the paper's m = 1 ablation),
query statistics (distinct queries, share that are exact catalogue titles, share of cases where a query is
the target's title, target among any query's results) and per-case queries in cases-test.json.
GPT-2 is replaced by the run's backbone, tuned with LoRA rather than fully; BM25's k1 and b are config keys
(not tuned on validation here).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
import torch

from recalign.data import Needs, few_shot
from recalign.errors import InputError
from recalign.eval import check_ks
from recalign.eval.grounding import clean_generation, normalise_title
from recalign.eval.intervals import ranking_intervals
from recalign.eval.metrics import ranking_metrics
from recalign.eval.retrieval import MERGES, BM25Index, merged_ranks
from recalign.llm import (GENERATIVE_TRAIN, LORA_CONFIG, MODEL_CONFIG, MODEL_NULLABLE, Backbone, Prompter, check_lora, check_model,
                          check_train, fill, generate_step, answer_loss, lora_step)
from recalign.llm.prompts import check_template
from recalign.llm.trie import cached_generate_step
from recalign.methods.api import Experiment, Method, RunContext
from recalign.tasks.ctr import fewer_than_asked
from recalign.tasks.next_item import (GENERATIVE_SAMPLES, check_generative_samples, diagnostics_lines,
                                      full_histories, generative_samples, item_diagnostics,
                                      period_popularity)
from recalign.tasks.text import HISTORY_FIELDS, SAMPLE_FIELDS, frame_fields

PROMPT = {
    "wrapper": "auto",  # auto | chat | alpaca | plain
    "system": "",  # chat wrapper's system message ("" = empty, null = the chat template's default)
    "instruction": "Write a search query for the next {noun} the user will want to watch.",
    "input": "Previously, the user watched: {history}. In the future, the user wants to watch",
    "output": "{title}",  # the trained answer (fields {title}, {genres}); the generated text is the query
    "append_eos": True,  # train the answer followed by the end token, so generation learns to stop
    "max_tokens": 512,  # longer prompts drop their oldest history items
}

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "prompt": copy.deepcopy(PROMPT),
    "samples": copy.deepcopy(GENERATIVE_SAMPLES),
    "lora": copy.deepcopy(LORA_CONFIG),
    "train": copy.deepcopy(GENERATIVE_TRAIN),
    "generate": {
        "queries": 5,  # m: beams of the beam search, each one query
        "max_new_tokens": 32,
        "batch_size": 0,  # prompts per forward pass (0 = model.batch_size)
        # cached: llm.trie.cached_beam_search (each prompt run once) | transformers: Backbone.generate (the
        # prompt run once per beam; same beams or better, several times slower on a CPU)
        "search": "cached",
        "length_penalty": 1.0,  # beam score = summed log-prob / length ** this (transformers' default 1)
    },
    "retrieval": {
        "item_text": "{title} {genres}",  # what BM25 indexes per item (fields {title}, {genres})
        "k1": 1.2,
        "b": 0.75,
        "method": "lucene",  # bm25s variant: lucene | robertson | atire | bm25l | bm25+
        "stopwords": "en",  # bm25s stop word list ("" = keep every word)
        "merge": "split",  # split: top K/m per query (the paper) | round_robin
    },
    "eval": {
        "ks": [1, 3, 5, 10, 20],
        "mask_history": True,  # the user's earlier interactions are never retrieved
    },
}

ANSWER_FIELDS = {"title": "Toy Story (1995)", "genres": "Animation Comedy"}


def genres(ds) -> list[str]:
    if "categories" not in ds.items:
        return ["" for _ in range(ds.n_items)]
    return [" ".join(str(c) for c in (cats if isinstance(cats, (list, tuple)) else [])) for cats in ds.items["categories"]]


def item_texts(ds, template: str) -> list[str]:
    return [fill(template, "retrieval.item_text", title=t, genres=g) for t, g in zip(ds.titles(), genres(ds))]


def render_answers(ds, frame: pd.DataFrame, prompt_cfg: dict, eos: str) -> list[str]:
    titles, gen = ds.titles(), genres(ds)
    end = eos if prompt_cfg.get("append_eos") else ""
    return [fill(prompt_cfg["output"], "prompt.output", title=titles[i], genres=gen[i]) + end for i in frame["item"]]


def validate(cfg: dict) -> None:
    check_model(cfg["model"], training=True)
    check_template(cfg["prompt"], "prompt", SAMPLE_FIELDS, uses_one_of=HISTORY_FIELDS)
    fill(cfg["prompt"]["output"], "prompt.output", **ANSWER_FIELDS)
    fill(cfg["retrieval"]["item_text"], "retrieval.item_text", **ANSWER_FIELDS)
    if not cfg["retrieval"]["item_text"].strip():
        raise InputError("retrieval.item_text: empty template; BM25 needs a text per item, e.g. '{title} {genres}'")
    check_generative_samples(cfg["samples"])
    check_lora(cfg["lora"])
    check_train(cfg["train"])
    check_ks(cfg["eval"]["ks"])
    g, r = cfg["generate"], cfg["retrieval"]
    if int(g["queries"]) < 1:
        raise InputError(f"generate.queries must be >= 1, got {g['queries']}")
    if int(g["max_new_tokens"]) < 1:
        raise InputError(f"generate.max_new_tokens must be >= 1, got {g['max_new_tokens']}")
    if g["batch_size"] < 0:
        raise InputError(f"generate.batch_size must be >= 0, got {g['batch_size']}")
    if g["search"] not in ("cached", "transformers"):
        raise InputError(f"generate.search: expected cached or transformers, got {g['search']!r}")
    lp = g["length_penalty"]
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or lp != lp:
        raise InputError(f"generate.length_penalty: expected a number, got {lp!r}")
    if r["merge"] not in MERGES:
        raise InputError(f"retrieval.merge: expected one of {', '.join(MERGES)}, got {r['merge']!r}")
    for key in ("k1", "b"):
        v = r[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v < 0 or (key == "b" and v > 1):
            raise InputError(f"retrieval.{key}: expected a number {'in [0, 1]' if key == 'b' else '>= 0'}, got {v!r}")
    if r["method"] not in ("lucene", "robertson", "atire", "bm25l", "bm25+"):
        raise InputError(f"retrieval.method: expected lucene, robertson, atire, bm25l or bm25+, got {r['method']!r}")
    if r["stopwords"] not in ("", "en", "english", None):
        raise InputError(f"retrieval.stopwords: expected 'en' or '' (none), got {r['stopwords']!r}")


def train_step(ctx: RunContext, backbone: Backbone, examples, valid_examples) -> dict:
    """Step 1: LoRA on (prompt, title) pairs (resumable), best epoch by the valid answer loss."""
    train = ctx.config["train"]
    evaluate = answer_loss(backbone, valid_examples, int(train["batch_size"]), bool(train["answer_only"]))
    return lora_step(ctx.run, backbone, examples, ctx.config["lora"], train, ctx.seed, "lora",
                     ctx.run.checkpoints / "adapter", evaluate=evaluate, log=lambda m: ctx.log(f"step 1: {m}"))


def evaluate_lists(per_query: list[list[np.ndarray]], targets: np.ndarray, ks: list[int], how: str) -> dict:
    """NDCG/HR/Recall/MRR@K (+ intervals) of the merged K-lists, one K at a time."""
    out = {}
    for k, ranks in merged_ranks(per_query, targets, ks, how).items():
        out.update(ranking_metrics(ranks, [k]))
        out.update(ranking_intervals(ranks, [k]))
    return {**out, "n": len(targets)}


def run(ctx: RunContext) -> dict:
    cfg = ctx.config
    ds = ctx.dataset
    ks = check_ks(cfg["eval"]["ks"])
    split, valid, test = generative_samples(ds, cfg["samples"])
    shots = few_shot(split.train, int(cfg["train"]["shots"]) or None, ctx.seed)
    ctx.log(f"GPT4Rec with {cfg['model']['name']}: {len(shots)} shots; {len(test)} test cases (of {split.sizes()})")

    r = cfg["retrieval"]
    started = time.perf_counter()
    index = BM25Index(item_texts(ds, r["item_text"]), float(r["k1"]), float(r["b"]), r["method"],
                      r["stopwords"] or None)
    index_seconds = time.perf_counter() - started

    backbone = ctx.backbone()
    p = cfg["prompt"]
    prompter = Prompter(p, backbone.tokenizer, p["wrapper"], p["system"], p["max_tokens"], backbone.count_tokens)
    prompts = {name: prompter.render_all(frame_fields(frame, ds.titles(), ctx.noun, with_target=False,
                                                      with_labels=False))
               for name, frame in (("train", shots), ("valid", valid), ("test", test))}
    eos = backbone.tokenizer.eos_token
    examples = list(zip(prompts["train"], render_answers(ds, shots, p, eos)))
    n_loss = int(cfg["train"]["valid_loss_size"])
    valid_examples = list(zip(prompts["valid"], render_answers(ds, valid, p, eos)))[:n_loss] if n_loss else []

    started = time.perf_counter()
    train_summary = train_step(ctx, backbone, examples, valid_examples)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    g = cfg["generate"]
    if g["search"] == "cached":
        generated = cached_generate_step(ctx.run, backbone, prompts["test"], "test", int(g["queries"]),
                                         int(g["max_new_tokens"]), int(g["batch_size"]) or None,
                                         float(g["length_penalty"]))
    else:
        generated = generate_step(ctx.run, backbone, prompts["test"], "test", int(g["queries"]),
                                  int(g["max_new_tokens"]), int(g["batch_size"]),
                                  length_penalty=float(g["length_penalty"]))
    queries = [[clean_generation(t) for t in row] for row in generated["texts"]]
    histories = full_histories(ds, test) if cfg["eval"]["mask_history"] else [()] * len(test)
    depth = max(ks)
    per_query = [[index.search(q, depth, exclude=h)[0] for q in row] for row, h in zip(queries, histories)]
    targets = test["item"].to_numpy(np.int64)
    metrics = evaluate_lists(per_query, targets, ks, r["merge"])
    top_query = {k: v for k, v in evaluate_lists([lists[:1] for lists in per_query], targets, ks, r["merge"]).items()
                 if not k.endswith("_ci")}
    eval_seconds = time.perf_counter() - started

    titles = ds.titles()
    catalogue = {normalise_title(t) for t in titles}
    flat = [q for row in queries for q in row]
    stats = {
        "cases": len(test), "queries_per_case": len(flat) / max(1, len(test)),
        "distinct_queries_per_case": float(np.mean([len({normalise_title(q) for q in row}) for row in queries])),
        "empty_queries": sum(not q.strip() for q in flat),
        "query_is_a_title": sum(normalise_title(q) in catalogue for q in flat) / max(1, len(flat)),
        "query_is_target_title": float(np.mean([normalise_title(titles[t]) in {normalise_title(q) for q in row}
                                                for t, row in zip(targets, queries)])),
        "target_retrieved": float(np.mean([any(t in lst for lst in lists) for t, lists in zip(targets, per_query)])),
        "distinct_top_queries": len({normalise_title(row[0]) for row in queries if row}),
    }
    first = [lists[0][0] if lists and len(lists[0]) else -1 for lists in per_query]  # the best query's top item
    diagnostics = item_diagnostics(first, targets, titles, period_popularity(ds, split.train["timestamp"].max()),
                                   full_histories(ds, test))
    ctx.log(f"queries: {stats['query_is_a_title']:.3f} are catalogue titles, target retrieved by some query in "
            f"{stats['target_retrieved']:.3f} of cases")
    merged = [merged_ranks([lists], [t], [depth], r["merge"])[depth][0] for lists, t in zip(per_query, targets)]
    users = [str(u) for u in ds.users["raw_id"]]
    # rank: the target's 0-based position in the merged list of the largest K; null when it is not in it
    rows = [{"user": int(u), "user_id": users[int(u)], "target": titles[int(t)], "queries": row,
             "rank": float(rank) if np.isfinite(rank) else None,
             "top_items": [[titles[int(i)] for i in lst[:3]] for lst in lists]}
            for u, t, row, lists, rank in zip(test["user"], targets, queries, per_query, merged)]
    ctx.run.write_json("cases-test.json", rows)
    empty_cases = sum(not any(len(lst) for lst in lists) for lists in per_query)
    warnings = [f"for {empty_cases} of {len(test)} test cases no generated query retrieved any item "
                f"({stats['empty_queries']} empty queries): those cases score 0"] if empty_cases else []
    return {
        "test": metrics, "valid": {}, "warnings": fewer_than_asked(cfg, len(shots), len(valid), len(test)) + warnings,
        "seconds": {"train": train_seconds, "eval": eval_seconds, "index": index_seconds},
        "variants": {"gpt4rec": {"test": {k: v for k, v in metrics.items() if not k.endswith("_ci")}},
                     "top_query": {"test": top_query}},
        "queries": stats,
        "generation": diagnostics,
        "examples": rows[:10],
        "train_summary": {k: train_summary.get(k) for k in ("steps", "epochs_run", "best_score", "best_step",
                                                            "tokens", "history")},
        "samples": {**split.sizes(), "shots": len(shots), "valid_cases": len(valid), "test_cases": len(test)},
    }


def _report(metrics: dict) -> str:
    lines = []
    variants = metrics.get("variants", {})
    if variants:
        columns = [c for c in next(iter(variants.values()))["test"] if c.startswith(("ndcg@", "hr@"))]
        lines += ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, v in variants.items():
            lines.append(f"| {name} | " + " | ".join(f"{v['test'].get(c, float('nan')):.4f}" for c in columns) + " |")
        lines.append("")
    q = metrics.get("queries")
    if q:
        lines += [f"Queries (test): {q['queries_per_case']:.1f} per case ({q['distinct_queries_per_case']:.1f} "
                  f"distinct), {q['query_is_a_title']:.3f} are exact catalogue titles, a query is the target's title "
                  f"in {q['query_is_target_title']:.3f} of cases, the target is among some query's results in "
                  f"{q['target_retrieved']:.3f}; {q['distinct_top_queries']} distinct top queries over {q['cases']} "
                  f"cases.", ""]
    if metrics.get("generation"):
        lines += [*diagnostics_lines(metrics["generation"]), ""]
    examples = metrics.get("examples", [])
    if examples:
        lines += ["| target | queries | rank |", "|---|---|---|"]
        for e in examples:
            rank = "–" if e["rank"] is None else f"{e['rank']:g}"
            lines.append(f"| {e['target']} | " + "; ".join(x[:40] for x in e["queries"][:3]) + f" | {rank} |")
    return "\n".join(lines) + "\n"


METHODS = [Method("gpt4rec", "GPT4Rec: the LLM (LoRA) writes m search queries from the history's titles by beam "
                             "search; BM25 over item texts retrieves per query; the lists are merged into top-K.",
                  DEFAULTS, run, report=_report, validate=validate, nullable=MODEL_NULLABLE,
                  # top_k=0: its top-K holds only what the queries retrieved, never the whole catalogue by itself
                  needs=lambda c: Needs.next_item(c["samples"]["history_len"], c["samples"]["targets"] == "liked",
                                                  top_k=0),
                  smoke={"model.name": "tiny-random", "train.shots": 8, "train.epochs": 1, "train.valid_loss_size": 4,
                         "samples.valid_size": 6, "samples.test_size": 8, "generate.queries": 3,
                         "generate.max_new_tokens": 6, "eval.ks": [1, 5]})]

_TABLE = "Generative baselines (P5, GPT4Rec) beside BIGRec"
EXPERIMENTS = [
    # ~2-3 min on the shared 2-core CPU with SmolLM2-135M
    Experiment("gpt4rec", "gpt4rec", table=_TABLE, profiles=("quick",),
               quick={"train.shots": 32, "train.epochs": 1, "train.valid_loss_size": 0, "samples.valid_size": 16,
                      "samples.test_size": 32, "generate.queries": 3, "generate.max_new_tokens": 20,
                      "eval.ks": [1, 5, 10]}),
    # the benchmark's setting (docs/benchmarks-generative.md), BIGRec's samples and test cases
    Experiment("gpt4rec-1024", "gpt4rec", table=_TABLE, profiles=("full",),
               full={"train.shots": 1024, "train.epochs": 1, "train.valid_loss_size": 32, "samples.valid_size": 100,
                     "samples.test_size": 200, "generate.queries": 5}),
]
