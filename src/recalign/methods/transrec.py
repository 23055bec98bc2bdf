"""TransRec: multi-facet identifiers and position-free constrained generation (Lin et al., KDD 2024).

Identifiers. Every item has three facets, written with the reference's markers: ID (` || 12 ##`), attribute,
one per category (` ## Comedy @@`), and title (` Toy Story (1995)`). An item's document is its identifiers
one after the other, tokenised by the backbone (`tasks.identifiers`, `llm.constrained.IdentifierCorpus`); all
documents form one corpus indexed by a suffix array (`eval.token_index`, cached on disk per tokenizer and
catalogue).

Step 1 (LoRA instruction tuning). Each training sample (a window of L watched items -> the next item, split
by the target's time, N few-shot samples) is rendered three ways, one prompt per facet (the history as IDs,
as categories, as titles), and the answer is the target's identifier of that facet: its ID, one of its
categories, or a span of its title starting at a random word (so any part of a title can be an answer).

Step 2 (generation). Per facet, beam search under `llm.constrained.IndexConstraint`: every generated token
sequence occurs in the corpus. The ID and attribute facets start at their opening marker and end after the
closing one; the title facet may start at any word a trained title span may start with (not a stopword or a
year), wherever it occurs (position-free), and ends where a document ends. Every prefix of a title beam and
every complete ID / attribute beam is a key n-gram with its log-probability.

D3's decoding (`generate.decoding` of BIGRec and P5) is deliberately not offered here: TransRec's beams are
scored by their summed log-probabilities (no length normalisation, so no amplification bias for ghost tokens to
cause), and each beam's probability enters the grounding's log-odds rather than ranking items directly.

Step 3 (aggregated grounding, `eval.ngram_grounding`). Keys score the items whose documents contain them:
max(0, log-odds of p(n|q) with facet bias against the smoothed corpus frequency)^gamma, summed per item
with a coverage penalty; full ranking of the catalogue with each user's earlier items masked. gamma and the
facet biases are config keys (the paper's 2 / ID 9, title 0, attribute 6) and are also chosen on the
validation cases from a grid (`grounding.select_on_valid`): test is reported at both.

Reported: NDCG / HR / Recall / MRR @ eval.ks on every test case; NDCG/Recall@5/10 on warm / cold target
items (seen / not seen in the tuning samples) and dense / sparse users (earlier interactions >= / <
eval.sparse_max_history); each facet alone (the paper's ablation); generation validity (the share of
returned beams that occur in the corpus: 1.0 by construction, checked), per-case output in cases-test.json.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recalign.data import Needs, few_shot
from recalign.data.splits import mark_warm_cold
from recalign.errors import InputError
from recalign.eval import check_ks, ranking_metrics, target_ranks
from recalign.eval.intervals import ranking_with_intervals
from recalign.report.summary import with_intervals
from recalign.eval.metrics import check_metric_name
from recalign.eval.ngram_grounding import GroundingParams, Key, evidence, item_scores
from recalign.eval.token_index import TokenIndex, cached_index
from recalign.llm import (GENERATIVE_TRAIN, LORA_CONFIG, MODEL_CONFIG, MODEL_NULLABLE, Backbone, Prompter, check_lora, check_model,
                          check_train, answer_loss, lora_step)
from recalign.llm.constrained import IdentifierCorpus, constrained_generate_step, keys_of
from recalign.llm.prompts import check_template
from recalign.methods.api import Experiment, Method, RunContext
from recalign.tasks.identifiers import FACETS, facet_answers, facet_texts, history_texts, title_start_words
from recalign.tasks.next_item import (GENERATIVE_SAMPLES, check_generative_samples, diagnostics_lines,
                                      full_histories, generative_samples, history_mask, item_diagnostics,
                                      next_item_warnings, period_popularity)
from recalign.tasks.text import SAMPLE_FIELDS, frame_fields

PROMPT = {
    "wrapper": "auto",  # auto | chat | alpaca | plain
    "system": "",  # chat wrapper's system message ("" = empty, null = the chat template's default)
    "max_tokens": 512,  # longer prompts drop their oldest history items
    # one template per facet; {history}: the history items written in that facet (quoted, oldest first)
    "id": {"instruction": "Given the IDs of the {noun}s a user watched, predict the ID of the next {noun} the "
                          "user will watch.",
           "input": "Watched {noun} IDs: {history}"},
    "title": {"instruction": "Given the {noun}s a user watched, predict the title of the next {noun} the user "
                             "will watch.",
              "input": "Watched {noun}s: {history}"},
    "attribute": {"instruction": "Given the categories of the {noun}s a user watched, predict a category of the "
                                 "next {noun} the user will watch.",
                  "input": "Categories of the watched {noun}s: {history}"},
}

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "prompt": copy.deepcopy(PROMPT),
    "samples": copy.deepcopy(GENERATIVE_SAMPLES),
    "lora": copy.deepcopy(LORA_CONFIG),
    "train": copy.deepcopy(GENERATIVE_TRAIN),  # each of the N shots is rendered once per facet (3N examples)
    "facets": {
        "use": ["id", "title", "attribute"],
        "markers": {"id": ["||", "##"], "attribute": ["##", "@@"]},  # opening / closing marker
        "title_span_words": 10,  # a title answer is up to this many words from a random start word (0 = whole)
        # where title generation may start: "word" = at a word a trained span may start with (not a stopword or
        # a year), "any" = at any token of the corpus (the reference)
        "title_start": "word",
    },
    "generate": {
        "beams": 15,
        "max_new_tokens": {"id": 10, "title": 16, "attribute": 10},
        "batch_size": 0,  # prompts per generate() call (0 = model.batch_size)
    },
    "grounding": {
        "gamma": 2.0,  # the exponent on each key's log-odds score (the reference's intra_facet_exponent)
        "bias": {"id": 9.0, "title": 0.0, "attribute": 6.0},  # added to a key's log p(n|q), per facet
        "smoothing": 5.0,  # added to corpus counts
        "coverage": 0.8,  # beta: a key whose tokens an item's better keys already cover counts (1 - beta)
        "max_log_prob": -1.0,  # cap on the biased log p(n|q) (the log-odds need p < 1)
        "select_on_valid": True,  # also choose gamma and the biases on the valid cases (generates them)
        "select_metric": "ndcg@10",
        "grid": {"gamma": [1.0, 2.0, 4.0], "id": [0.0, 3.0, 9.0], "title": [0.0], "attribute": [0.0, 3.0, 6.0]},
        "cache_dir": "",  # where the token index is kept ("" = $RECALIGN_HOME/transrec-index)
    },
    "eval": {
        "ks": [1, 5, 10, 20],
        "mask_history": True,  # the user's earlier interactions are not candidates
        "sparse_max_history": 50,  # users with fewer earlier interactions than this are "sparse"
    },
}

GROUP_METRICS = ("ndcg@5", "ndcg@10", "recall@5", "recall@10")


# ---------------------------------------------------------------------------------------- identifiers
def facet_prompts(backbone: Backbone, history: dict, frame: pd.DataFrame, p: dict, noun: str,
                  use: list[str]) -> dict[str, list[str]]:
    """Per facet, one prompt per sample: its template with the history written in that facet."""
    out = {}
    for facet in use:
        prompter = Prompter(p[facet], backbone.tokenizer, p["wrapper"], p["system"], p["max_tokens"],
                            backbone.count_tokens, where=f"prompt.{facet}")
        out[facet] = prompter.render_all(frame_fields(frame, history[facet], noun, with_target=False,
                                                      with_labels=False))
    return out


def build_index(ctx: RunContext, corpus: IdentifierCorpus, backbone: Backbone) -> tuple[TokenIndex, bool]:
    from recalign import assets

    directory = ctx.config["grounding"]["cache_dir"] or (assets.home() / "transrec-index")
    return cached_index(corpus.docs, int(backbone.tokenizer.eos_token_id), directory)


# ------------------------------------------------------------------------------------------- steps
def train_step(ctx: RunContext, backbone: Backbone, examples, valid_examples) -> dict:
    """Step 1: LoRA on every facet's (prompt, answer) pairs; the best epoch by the valid answer loss."""
    train = ctx.config["train"]
    evaluate = answer_loss(backbone, valid_examples, int(train["batch_size"]), bool(train["answer_only"]))
    return lora_step(ctx.run, backbone, examples, ctx.config["lora"], train, ctx.seed, "lora",
                     ctx.run.checkpoints / "adapter", evaluate=evaluate, log=lambda m: ctx.log(f"step 1: {m}"))


@dataclass
class CaseSet:
    """The evaluation cases of one split after step 2: their beams, keys and index evidence, targets, masks."""

    frame: pd.DataFrame
    histories: list
    targets: torch.Tensor
    mask: torch.Tensor | None
    beams: dict  # facet -> constrained_generate_step's state
    keys: list[list[Key]]
    evidences: list

    def ranks(self, params: GroundingParams, facets: list[str] | None = None) -> torch.Tensor:
        """0-based rank of every target under aggregated grounding (only `facets`' keys when given)."""
        scores = torch.from_numpy(np.stack([item_scores(ev if facets is None else ev.subset(facets), params)
                                            for ev in self.evidences]))
        return target_ranks(scores, self.targets, self.mask)

    def target_scores(self, params: GroundingParams) -> np.ndarray:
        return np.asarray([item_scores(ev, params)[t] for ev, t in zip(self.evidences, self.targets.tolist())])


def generate_cases(ctx: RunContext, backbone: Backbone, corpus: IdentifierCorpus, index: TokenIndex,
                   prompts: dict, frame: pd.DataFrame, split: str) -> CaseSet:
    """Step 2: constrained beam search per facet; every prefix of a title beam and every whole ID / attribute
    beam becomes a key with its log-probability; the keys are looked up in the index once."""
    g = ctx.config["generate"]
    block = int(g["batch_size"]) or backbone.batch_size
    keys: list[list[Key]] = [[] for _ in range(len(frame))]
    beams = {}
    for facet in prompts:
        rule = corpus.rules[facet]
        beams[facet] = constrained_generate_step(ctx.run, backbone, prompts[facet], f"{split}-{facet}", index, rule,
                                                 int(g["beams"]), int(g["max_new_tokens"][facet]), block=block)
        for case, (tokens, log_probs) in enumerate(zip(beams[facet]["tokens"], beams[facet]["log_probs"])):
            keys[case] += keys_of(tokens, log_probs, rule, prefixes=(facet == "title"),
                                  make=lambda n, lp, f=facet: Key(n, lp, f))
    histories = full_histories(ctx.dataset, frame)
    return CaseSet(frame, histories, torch.from_numpy(frame["item"].to_numpy(np.int64).copy()),
                   history_mask(histories, ctx.dataset.n_items) if ctx.config["eval"]["mask_history"] else None,
                   beams, keys, [evidence(k, index) for k in keys])


def params_of(gamma: float, biases: dict, cfg: dict) -> GroundingParams:
    return GroundingParams(gamma=float(gamma), biases={f: float(b) for f, b in biases.items()},
                           smoothing=float(cfg["smoothing"]), coverage=float(cfg["coverage"]),
                           max_log_prob=float(cfg["max_log_prob"]))


def grid_params(cfg: dict, use: list[str]) -> list[GroundingParams]:
    """The paper's (configured) setting first, then every grid point (ties on valid keep the earlier one)."""
    g = cfg["grid"]
    out = [params_of(cfg["gamma"], cfg["bias"], cfg)]
    for gamma in g["gamma"]:
        for b_id in g["id"] if "id" in use else [cfg["bias"]["id"]]:
            for b_title in g["title"] if "title" in use else [cfg["bias"]["title"]]:
                for b_attr in g["attribute"] if "attribute" in use else [cfg["bias"]["attribute"]]:
                    out.append(params_of(gamma, {"id": b_id, "title": b_title, "attribute": b_attr}, cfg))
    return out


def select_on_valid(valid: CaseSet, gp: dict, use: list[str], ks: list[int]) -> tuple[GroundingParams, list, float]:
    """gamma and the facet biases with the best valid `grounding.select_metric` (the grid and the value)."""
    metric = gp["select_metric"]
    grid = [(ranking_metrics(valid.ranks(params), ks)[metric], params) for params in grid_params(gp, use)]
    best, chosen = max(grid, key=lambda x: x[0])  # max keeps the first best: the paper's setting wins ties
    return chosen, [{**_params_dict(q), metric: v} for v, q in grid], best


def generation_stats(cases: CaseSet, corpus: IdentifierCorpus, index: TokenIndex, target_scores: np.ndarray) -> dict:
    """validity: share of returned beams that occur in the corpus (1.0 by construction); complete: share of
    beams that are whole identifiers; target_reached: share of cases where a key reaches the target (its
    score > 0); top_id_is_target: the top ID beam is the target's ID."""
    n_beams = n_valid = 0
    out = {}
    targets = cases.targets.tolist()
    for facet, state in cases.beams.items():
        seqs = [s for row in state["tokens"] for s in row]
        valid = sum(index.count(s) > 0 for s in seqs)
        n_beams, n_valid = n_beams + len(seqs), n_valid + valid
        complete = sum(corpus.rules[facet].complete(s) for s in seqs)
        out[facet] = {"beams": len(seqs), "validity": valid / max(1, len(seqs)),
                      "complete": complete / max(1, len(seqs)),
                      "empty_cases": sum(1 for row in state["tokens"] if not row)}
    if "id" in cases.beams:
        tops = [row[0] if row else None for row in cases.beams["id"]["tokens"]]
        hits = sum(top is not None and tuple(top) == tuple(corpus.tokens["id"][t][0]) for top, t in zip(tops, targets))
        out["top_id_is_target"] = hits / max(1, len(targets))
    out["validity"] = n_valid / max(1, n_beams)
    out["beams"] = n_beams
    out["target_reached"] = float(np.mean(target_scores > 0)) if len(targets) else 0.0
    out["keys_per_case"] = float(np.mean([len(k) for k in cases.keys])) if cases.keys else 0.0
    return out


# --------------------------------------------------------------------------------------------- run
def _integer(value, where: str, minimum: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{where} must be an integer >= {minimum}{note}, got {value!r}")


def _number(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where} must be a finite number, got {value!r}")


def validate(cfg: dict) -> None:
    check_model(cfg["model"], training=True)
    p = cfg["prompt"]
    check_template({"wrapper": p["wrapper"]}, "prompt", SAMPLE_FIELDS, keys=())
    for facet in FACETS:
        check_template(p[facet], f"prompt.{facet}", SAMPLE_FIELDS)
    check_generative_samples(cfg["samples"])
    check_lora(cfg["lora"])
    _integer(cfg["train"]["shots"], "train.shots", 0, " (0 = all training samples)")
    _integer(cfg["train"]["valid_loss_size"], "train.valid_loss_size", 0)
    check_train(cfg["train"])
    f = cfg["facets"]
    use = f["use"]
    if (not use or not all(isinstance(x, str) and x in FACETS for x in use) or len(set(use)) != len(use)):
        raise InputError(f"facets.use: expected a non-empty list of distinct facets from {', '.join(FACETS)}, "
                         f"got {use!r}")
    for facet in ("id", "attribute"):
        pair = f["markers"].get(facet)
        if (not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(m, str) and m.strip() == m and m
                                                                     for m in pair)):
            raise InputError(f"facets.markers.{facet}: expected [opening, closing], two non-empty strings without "
                             f"spaces, got {pair!r}")
    _integer(f["title_span_words"], "facets.title_span_words", 0, " (0 = the whole title)")
    if f["title_start"] not in ("word", "any"):
        raise InputError(f"facets.title_start: expected word or any, got {f['title_start']!r}")
    g = cfg["generate"]
    _integer(g["beams"], "generate.beams", 1)
    _integer(g["batch_size"], "generate.batch_size", 0, " (0 = model.batch_size)")
    for facet in FACETS:
        _integer(g["max_new_tokens"].get(facet), f"generate.max_new_tokens.{facet}", 1)
    gr = cfg["grounding"]
    for key in ("gamma", "smoothing", "coverage", "max_log_prob"):
        _number(gr[key], f"grounding.{key}")
    for facet in FACETS:
        _number(gr["bias"].get(facet), f"grounding.bias.{facet}")
    params_of(gr["gamma"], gr["bias"], gr)  # the ranges of gamma, smoothing, coverage, max_log_prob
    for name, values in gr["grid"].items():
        if (not isinstance(values, list) or not values
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values)):
            raise InputError(f"grounding.grid.{name}: expected a non-empty list of numbers, got {values!r}")
    if any(v <= 0 for v in gr["grid"]["gamma"]):
        raise InputError(f"grounding.grid.gamma: every gamma must be > 0, got {gr['grid']['gamma']}")
    check_metric_name(gr["select_metric"], "grounding.select_metric")
    if gr["select_metric"] in ("", "auc", "uauc"):
        raise InputError(f"grounding.select_metric: expected a ranking metric such as ndcg@10, got "
                         f"{gr['select_metric']!r}")
    check_ks(cfg["eval"]["ks"])
    _integer(cfg["eval"]["sparse_max_history"], "eval.sparse_max_history", 1)


def run(ctx: RunContext) -> dict:
    cfg = ctx.config
    ds = ctx.dataset
    ks = check_ks(cfg["eval"]["ks"])
    gp = cfg["grounding"]
    metric_ks = sorted(set(ks) | {int(gp["select_metric"].split("@")[1]), 5, 10})
    split, valid, test = generative_samples(ds, cfg["samples"])
    shots = few_shot(split.train, int(cfg["train"]["shots"]) or None, ctx.seed)
    use = list(cfg["facets"]["use"])
    tune = bool(gp["select_on_valid"])
    ctx.log(f"TransRec with {cfg['model']['name']}, facets {', '.join(use)}: {len(shots)} shots; "
            f"{len(valid)} valid / {len(test)} test cases (of {split.sizes()})")

    backbone = ctx.backbone()
    started = time.perf_counter()
    f = cfg["facets"]
    texts = facet_texts(ds, use, f["markers"])
    starts = title_start_words(texts) if "title" in texts and f["title_start"] == "word" else ()
    corpus = IdentifierCorpus(texts, backbone.tokenizer, f["markers"], [str(r) for r in ds.items["raw_id"]], starts)
    index, cached = build_index(ctx, corpus, backbone)
    index_seconds = time.perf_counter() - started
    ctx.log(f"identifier index: {index.n_docs} items, {index.n_tokens} tokens, "
            f"{'from the cache' if cached else 'built'} in {index_seconds:.1f}s")

    # step 1: every sample rendered once per facet, the answer is the target's identifier of that facet
    frames = {"train": shots, "valid": valid, "test": test}
    history = history_texts(ds)
    prompts = {name: facet_prompts(backbone, history, frame, cfg["prompt"], ctx.noun, use)
               for name, frame in frames.items()}
    eos = backbone.tokenizer.eos_token or ""
    span_words = int(cfg["facets"]["title_span_words"])
    train_answers = facet_answers(texts, shots["item"].tolist(), use, span_words, eos, ctx.seed)
    examples = [(prompts["train"][f][i], train_answers[f][i]) for i in range(len(shots)) for f in use]
    n_loss = min(int(cfg["train"]["valid_loss_size"]), len(valid))
    valid_answers = facet_answers(texts, valid["item"].tolist()[:n_loss], use, span_words, eos, ctx.seed + 1)
    valid_examples = [(prompts["valid"][f][i], valid_answers[f][i]) for i in range(n_loss) for f in use]
    started = time.perf_counter()
    train_summary = train_step(ctx, backbone, examples, valid_examples)
    train_seconds = time.perf_counter() - started

    # steps 2 and 3: constrained generation per facet, aggregated grounding, full ranking
    started = time.perf_counter()
    cases = {name: generate_cases(ctx, backbone, corpus, index, prompts[name], frames[name], name)
             for name in (("valid", "test") if tune else ("test",))}
    default = params_of(gp["gamma"], gp["bias"], gp)
    ranks = {"rank": cases["test"].ranks(default)}
    variants = {"transrec": {"test": ranking_metrics(ranks["rank"], metric_ks), "params": _params_dict(default)}}
    for facet in use if len(use) > 1 else []:  # the paper's ablation: one facet's keys alone
        ranks[f"rank_{facet}_only"] = cases["test"].ranks(default, [facet])
        variants[f"{facet} facet only"] = {"test": ranking_metrics(ranks[f"rank_{facet}_only"], metric_ks)}
    valid_metrics = {}
    if tune:
        chosen, grid, best = select_on_valid(cases["valid"], gp, use, metric_ks)
        valid_metrics = ranking_metrics(cases["valid"].ranks(default), metric_ks)
        ranks["rank_tuned"] = cases["test"].ranks(chosen)
        variants["transrec (valid-chosen gamma, biases)"] = {
            "test": ranking_metrics(ranks["rank_tuned"], metric_ks), "params": _params_dict(chosen),
            "valid": {gp["select_metric"]: best}, "grid": grid}
    groups = user_item_groups(test, cases["test"].histories, shots, cfg["eval"]["sparse_max_history"])
    test_metrics = headline(ranks, groups, metric_ks)
    stats = {name: generation_stats(c, corpus, index, c.target_scores(default)) for name, c in cases.items()}
    diagnostics = first_item_diagnostics(ds, cases["test"], default, split.train["timestamp"].max())
    eval_seconds = time.perf_counter() - started
    ctx.log("generation: " + ", ".join(f"{n} validity {s['validity']:.3f} target reached {s['target_reached']:.3f}"
                                       for n, s in stats.items()))
    answer_tokens = [backbone.tokenize_piece(a[:len(a) - len(eos)] if eos and a.endswith(eos) else a)
                     for _, a in examples]
    return {
        "test": test_metrics, "valid": valid_metrics,
        "seconds": {"train": train_seconds, "eval": eval_seconds, "index": index_seconds},
        "variants": variants,
        "groups": {g: int(rows.sum()) for g, rows in groups.items()},
        "validity": {n: s["validity"] for n, s in stats.items()},
        "generation": stats,
        "diagnostics": diagnostics,
        "answers_in_index": float(np.mean([index.count(t) > 0 for t in answer_tokens])) if examples else 0.0,
        "examples": write_cases(ctx, backbone, cases["test"], default, ranks, groups, ds.titles()),
        "train_summary": {k: train_summary.get(k) for k in ("steps", "epochs_run", "best_score", "best_step",
                                                            "tokens", "history")},
        "samples": {**split.sizes(), "shots": len(shots), "train_examples": len(examples),
                    "valid_cases": len(valid), "test_cases": len(test)},
        "index": {"items": index.n_docs, "tokens": index.n_tokens, "cached": cached,
                  "distinct_tokens": int(len(index.uni_tokens))},
        "warnings": next_item_warnings(cfg, len(shots), len(valid), len(test), cases["test"].histories,
                                       cases["test"].targets, ds.n_items, metric_ks),
    }


def first_item_diagnostics(ds, cases: CaseSet, params: GroundingParams, cutoff) -> dict:
    """`item_diagnostics` of each test case's top-ranked item (history masked; -1 when no key reached an item)."""
    top = []
    for i, ev in enumerate(cases.evidences):
        scores = item_scores(ev, params).astype(np.float64)
        if cases.mask is not None:
            scores[cases.mask[i].numpy()] = -np.inf
        top.append(int(np.argmax(scores)) if scores.max() > 0 else -1)
    return item_diagnostics(top, cases.targets.numpy(), ds.titles(), period_popularity(ds, cutoff), cases.histories)


def headline(ranks: dict, groups: dict, ks: list[int]) -> dict:
    """metrics.json's `test`: every ranking metric at the configured grounding, NDCG/Recall@5/10 per group
    (`ndcg@10_warm`, ...), and NDCG/Recall at the valid-chosen grounding (`ndcg@10_tuned`, ...); the
    headline NDCG/HR@K carry their 95% intervals (`ndcg@10_ci`, ...)."""
    out = ranking_with_intervals(ranks["rank"].numpy(), ks)
    for group, rows in groups.items():
        if rows.any():
            metrics = ranking_metrics(ranks["rank"][torch.tensor(rows)], ks)
            out.update({f"{m}_{group}": metrics[m] for m in GROUP_METRICS})
    if "rank_tuned" in ranks:
        tuned = ranking_metrics(ranks["rank_tuned"], ks)
        out.update({f"{m}_tuned": v for m, v in tuned.items() if m.startswith(("ndcg@", "recall@"))})
    return out


def user_item_groups(frame: pd.DataFrame, histories, shots: pd.DataFrame, sparse_max: int) -> dict[str, np.ndarray]:
    """Boolean rows per group: warm / cold target items (seen or not in the tuning samples, as target or in a
    history) and dense / sparse users (earlier interactions >= / < sparse_max)."""
    warm = mark_warm_cold(frame, shots)["warm_item"].to_numpy(bool)
    lengths = np.asarray([len(h) for h in histories])
    return {"warm": warm, "cold": ~warm, "dense": lengths >= sparse_max, "sparse": lengths < sparse_max}


def _params_dict(params: GroundingParams) -> dict:
    return {"gamma": params.gamma, **{f"bias_{f}": b for f, b in params.biases.items()}}


def write_cases(ctx: RunContext, backbone: Backbone, cases: CaseSet, params: GroundingParams, ranks: dict,
                groups: dict, titles: list[str]) -> list[dict]:
    """cases-test.json: per test case the top beam of each facet (text, log-prob), the top 5 items, the
    target's 0-based rank (`rank`; with one facet's keys only, `rank_FACET_only`; at the valid-chosen gamma and
    biases, `rank_tuned`) and its groups (warm/cold item, dense/sparse user). Returns the first 20."""
    decode = backbone.tokenizer.decode
    rows = []
    for i, (user, target) in enumerate(zip(cases.frame["user"].tolist(), cases.targets.tolist())):
        scores = item_scores(cases.evidences[i], params)
        top = np.argsort(-scores, kind="stable")[:5]
        generated = {facet: {"text": decode(state["tokens"][i][0]).strip(),
                             "log_prob": float(sum(state["log_probs"][i][0]))}
                     for facet, state in cases.beams.items() if state["tokens"][i]}
        rows.append({"user": int(user), "target": titles[target], "generated": generated,
                     "top": [titles[j] for j in top if scores[j] > 0],
                     **{name: float(r[i]) for name, r in ranks.items()},
                     "groups": [g for g, member in groups.items() if member[i]]})
    ctx.run.write_json("cases-test.json", rows)
    return rows[:20]


def _report(metrics: dict) -> str:
    variants = metrics.get("variants", {})
    test = metrics.get("test", {})
    ks = sorted({int(k.split("@")[1]) for k in test if k.startswith("ndcg@") and "_" not in k})
    columns = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    lines = ["### Test: TransRec, its facets alone, and the valid-chosen grounding", "",
             "| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, v in variants.items():
        spans = with_intervals(test, columns) if name == "transrec" else {}  # the headline row: with intervals
        lines.append(f"| {name} | " + " | ".join(spans[c] if isinstance(spans.get(c), str)
                                                 else f"{v['test'].get(c, float('nan')):.4f}" for c in columns) + " |")
    for name, v in variants.items():
        if "params" in v:
            lines.append(f"\n{name}: " + ", ".join(f"{k} {val:g}" for k, val in v["params"].items()))
    groups = metrics.get("groups", {})
    if groups:
        lines += ["", "| group | cases | " + " | ".join(GROUP_METRICS) + " |", "|---" * (len(GROUP_METRICS) + 2) + "|"]
        for group, n in groups.items():
            lines.append(f"| {group} | {n} | " + " | ".join(
                f"{test[f'{m}_{group}']:.4f}" if f"{m}_{group}" in test else "–" for m in GROUP_METRICS) + " |")
    gen = metrics.get("generation", {}).get("test")
    if gen:
        lines += ["", f"Generation (test): validity {gen['validity']:.3f} over {gen['beams']} beams (share that "
                      f"occur in the identifier corpus), target reached by a key in {gen['target_reached']:.3f} "
                      f"of the cases, {gen['keys_per_case']:.1f} keys per case."]
    if metrics.get("diagnostics"):
        lines += ["", *diagnostics_lines(metrics["diagnostics"])]
    examples = metrics.get("examples", [])
    if examples:
        lines += ["", "| target | generated (top beam per facet) | top item | rank |", "|---|---|---|---|"]
        for e in examples[:10]:
            gen_text = "; ".join(f"{f}: {g['text'][:40]}" for f, g in e["generated"].items())
            lines.append(f"| {e['target']} | {gen_text} | {(e['top'] or ['–'])[0]} | {e['rank']:g} |")
    return "\n".join(lines) + "\n"


METHODS = [Method("transrec", "Multi-facet identifiers (ID, title, attribute), position-free constrained beam "
                              "search over a suffix-array index, aggregated grounding (TransRec).",
                  DEFAULTS, run, report=_report, validate=validate, nullable=MODEL_NULLABLE,
                  needs=lambda c: Needs.next_item(c["samples"]["history_len"], c["samples"]["targets"] == "liked",
                                                  max(c["eval"]["ks"])),
                  smoke={"model.name": "tiny-random", "train.shots": 6, "train.epochs": 1, "train.valid_loss_size": 2,
                         "samples.valid_size": 3, "samples.test_size": 4, "generate.beams": 2,
                         "generate.max_new_tokens": {"id": 6, "title": 4, "attribute": 5},
                         "grounding.grid": {"gamma": [2.0], "id": [0.0, 9.0], "title": [0.0], "attribute": [6.0]}})]

_TABLE = "TransRec: multi-facet identifiers, constrained generation, aggregated grounding (few-shot)"
EXPERIMENTS = [
    # the whole pipeline in miniature: about 2 CPU-minutes (48 tuning examples, 16 test cases x 3 facets)
    Experiment("transrec", "transrec", table=_TABLE, profiles=("quick",),
               quick={"train.shots": 16, "train.epochs": 1, "train.valid_loss_size": 0, "samples.test_size": 16,
                      "grounding.select_on_valid": False, "generate.beams": 3,
                      "generate.max_new_tokens": {"id": 8, "title": 10, "attribute": 8}}),
    # BIGRec's benchmark setting (bigrec-1024: the same samples and test cases), with grounding tuned on valid
    Experiment("transrec-1024", "transrec", table=_TABLE, profiles=("full",),
               full={"train.shots": 1024, "train.epochs": 1, "train.valid_loss_size": 32, "samples.valid_size": 100,
                     "samples.test_size": 200, "generate.beams": 4}),
]
