"""P5: recommendation as language processing, sequential-recommendation prompts (Geng et al., RecSys 2022).

Items are written as number identifiers (`ids.indexing`): `sequential` (P5's sequential indexing, Hua et al.
2023: numbers handed out in order of first appearance in the users' time-ordered sequences, user after
user, here over the training period only so that test-period order does not leak into the numbers; items
first seen later get the numbers after), `random` (a seeded random permutation of the same numbers) or `raw`
(the dataset's own item ids). The prompt is P5's "sequential recommendation" template: the user's id and the
history as identifiers ("Given the following watching history of user_23: 12, 13, 27 ..."), the answer is
the target's identifier followed by the end token.

Step 1: LoRA tuning with the LM loss on the answer tokens (the generative samples of BIGRec: windows of L
items -> the next item, split by the target's time, N few-shot samples; best epoch by the valid answer loss).
Step 2: beam search (`generate.beams`, 20 by default) under a prefix trie of every item's identifier tokens
(`llm.trie`): a beam can only spell a catalogue identifier, so every returned beam is an item. The default
search runs each prompt once and extends its KV cache per beam (`trie_beam_search`); `generate.search:
transformers` runs `Backbone.generate` with the trie as a LogitsProcessor (the prompt copied per beam, and an
identifier finished outside a step's top `beams` candidates is dropped, so its lists are never better; much
slower on a CPU). With `generate.exclude_history` the user's earlier items may not be finished (the
evaluator masks them anyway, so beams are not spent on them). The beams' items, by beam score (the sum of
the tokens' log-probabilities), are the ranked list; every other item ranks below them, tied (expected rank).
`generate.decoding` swaps the search for the shared loops of `llm.decoding` under the same trie and bans:
`d3` (beam search with D3's ghost-aware length normalisation, `generate.ghost_threshold`) or `sample`
(`generate.samples` draws per prompt merged by frequency; the list is ordered by how often each item was drawn).

Reported: NDCG / HR / Recall / MRR @ eval.ks with 95% bootstrap intervals on every test case (the same
cases, history masking and metrics as BIGRec), validity (share of returned beams that are catalogue
identifiers: 1.0 by construction), beams per case, the collapse diagnostics of the first item per case
(`tasks.next_item.item_diagnostics`: distinct items, the most returned titles, popularity deciles against the
targets', the share already in the history), and the per-case beams in cases-test.json.
Not implemented from the paper: P5's whole-word embeddings (a second embedding table marking which
sub-tokens form one identifier), its other prompt families and multitask pretraining; T5 is replaced by the
run's decoder-only backbone.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
import torch

from recalign.data import Needs, few_shot
from recalign.config import check_seed
from recalign.errors import InputError
from recalign.eval import check_ks
from recalign.eval.intervals import ranking_with_intervals
from recalign.eval.metrics import target_ranks
from recalign.llm import (GENERATIVE_TRAIN, LORA_CONFIG, MODEL_CONFIG, MODEL_NULLABLE, Backbone, Prompter, check_lora, check_model,
                          check_train, fill, generate_step, answer_loss, lora_step)
from recalign.llm.prompts import check_template
from recalign.llm.decoding import DECODING_CONFIG, check_decoding
from recalign.llm.trie import IdTrie, TrieConstraint, decode_beams, trie_generate_step
from recalign.methods.api import Experiment, Method, RunContext
from recalign.tasks.next_item import (GENERATIVE_SAMPLES, check_generative_samples, diagnostics_lines,
                                      full_histories, generative_samples, history_mask, item_diagnostics,
                                      next_item_warnings, period_popularity)

INDEXINGS = ("sequential", "random", "raw")

PROMPT = {
    "wrapper": "auto",  # auto | chat | alpaca | plain
    "system": "",  # chat wrapper's system message ("" = empty, null = the chat template's default)
    # P5's sequential-recommendation prompt (2-1), worded for the domain; fields: {user} (the raw user id),
    # {history} (identifiers, oldest first, joined by ids.separator), {noun}, {n_history}
    "instruction": ("Given the following watching history of user_{user}: {history}\n"
                    "predict the next possible {noun} to be watched by the user. Answer with its ID."),
    "input": "",
    "output": "{id}",  # the trained answer (then the end token); generation is constrained to these texts
    "max_tokens": 512,  # longer prompts drop their oldest history items
}

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "prompt": copy.deepcopy(PROMPT),
    "ids": {
        "indexing": "sequential",  # sequential | random | raw
        "start": 1,  # the first number (sequential, random)
        "seed": 0,  # the permutation of random indexing
        "separator": ", ",  # between the history's identifiers in the prompt
    },
    "samples": copy.deepcopy(GENERATIVE_SAMPLES),
    "lora": copy.deepcopy(LORA_CONFIG),
    "train": copy.deepcopy(GENERATIVE_TRAIN),
    "generate": {
        "beams": 20,  # beams = the ranked list's length (set it >= the largest K)
        "batch_size": 0,  # prompts per forward pass (0 = model.batch_size)
        "exclude_history": True,  # beams may not end in one of the user's earlier items
        # cached: llm.trie.trie_beam_search (each prompt run once) | transformers: Backbone.generate +
        # TrieConstraint (the prompt run once per beam)
        "search": "cached",
        "length_penalty": 0.0,  # 0: beam score = log P(identifier); 1: divided by its token count
        # beam: the search above | d3: llm.decoding's beam search with D3's ghost-aware length normalisation
        # (ghost_threshold) under the same trie | sample: `samples` draws per prompt (temperature, top_p) under
        # the trie, merged by frequency
        **{k: v for k, v in DECODING_CONFIG.items() if k not in ("constrained", "assistant", "assistant_weights")},
    },
    "eval": {
        "ks": [1, 3, 5, 10, 20],
        "mask_history": True,  # the user's earlier interactions are not candidates
    },
}

EXAMPLE_FIELDS = {"user": "23", "history": "1, 2", "noun": "movie", "n_history": 2}


# ------------------------------------------------------------------------------------------ identifiers
def item_numbers(ds, indexing: str, start: int, seed: int, cutoff=None) -> list[str]:
    """Every item's identifier text. `cutoff`: the last timestamp whose interactions order sequential ids."""
    n = ds.n_items
    if indexing == "raw":
        return [str(r) for r in ds.items["raw_id"]]
    if indexing == "random":
        numbers = np.random.default_rng(seed).permutation(n) + start
        return [str(int(x)) for x in numbers]
    if indexing != "sequential":
        raise InputError(f"ids.indexing: expected one of {', '.join(INDEXINGS)}, got {indexing!r}")
    inter = ds.interactions  # sorted by (user, time)
    if cutoff is not None:
        inter = inter[inter["timestamp"] <= cutoff]
    seen = pd.unique(inter["item"].to_numpy())  # order of first appearance, user after user
    rest = np.setdiff1d(np.arange(n), seen)  # items first seen after the cutoff, in dense order
    order = np.concatenate([seen, rest]).astype(np.int64)
    numbers = np.empty(n, dtype=np.int64)
    numbers[order] = np.arange(n) + start
    return [str(int(x)) for x in numbers]


def id_answers(ids: list[str], output: str, eos: str) -> list[str]:
    return [fill(output, "prompt.output", id=i) + eos for i in ids]


def build_trie(backbone: Backbone, answers: list[str]) -> IdTrie:
    """The trie of every item's answer tokens (tokenised as the training appends them after a prompt)."""
    encoded = backbone.tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos = backbone.tokenizer.eos_token_id
    for text, tokens in zip(answers, encoded):
        if not tokens or tokens[-1] != eos or eos in tokens[:-1]:
            raise InputError(f"prompt.output: the answer {text!r} does not tokenise to identifier tokens + one end "
                             f"token")
    return IdTrie(encoded)


def id_fields(frame: pd.DataFrame, ids: list[str], users: list[str], noun: str, separator: str):
    """Per sample: (fields(k) for the k most recent history items, history length) for `Prompter.render_all`."""
    out = []
    for user, history in zip(frame["user"], frame["history"]):
        def fields(k: int, user=user, history=history) -> dict:
            recent = history[len(history) - k:] if k else ()
            return {"user": users[int(user)], "history": separator.join(ids[int(i)] for i in recent),
                    "noun": noun, "n_history": len(recent)}

        out.append((fields, len(history)))
    return out


def shared_decoding(ctx: RunContext, backbone: Backbone, prompts: list[str], trie: IdTrie, ids: list[str], banned):
    """generate.decoding d3 / sample: `llm.generate_step`'s loops under the identifiers' TrieConstraint (with
    the history bans) -> (items per case, their scores, sequences returned). A returned sequence maps back to
    its item by its identifier text."""
    g = ctx.config["generate"]
    section = {k: g[k] for k in DECODING_CONFIG if k in g}
    constraint = TrieConstraint(trie, backbone.tokenizer.eos_token_id, backbone.pad_id, banned)
    generated = generate_step(ctx.run, backbone, prompts, "test", int(g["beams"]), trie.max_len, int(g["batch_size"]),
                              decoding=section, seed=ctx.seed, logits_processor=constraint)
    by_text = {fill(ctx.config["prompt"]["output"], "prompt.output", id=i).strip(): n for n, i in enumerate(ids)}
    items, scores, returned = [], [], 0
    for texts, values in zip(generated["texts"], generated["scores"]):
        seen, row, kept = set(), [], []
        for text, value in zip(texts, values):
            if value != value or value < -1e8 or not text:  # fillers of a case with fewer sequences
                continue
            returned += 1
            item = by_text.get(text.strip())
            if item is not None and item not in seen:
                seen.add(item)
                row.append(item)
                kept.append(float(value))
        items.append(row)
        scores.append(kept)
    return items, scores, returned


# ------------------------------------------------------------------------------------------------ run
def validate(cfg: dict) -> None:
    check_model(cfg["model"], training=True)
    check_template(cfg["prompt"], "prompt", EXAMPLE_FIELDS)
    fill(cfg["prompt"]["output"], "prompt.output", id="12")
    if "{id}" not in cfg["prompt"]["output"]:
        raise InputError(f"prompt.output must contain {{id}}, got {cfg['prompt']['output']!r}")
    if cfg["ids"]["indexing"] not in INDEXINGS:
        raise InputError(f"ids.indexing: expected one of {', '.join(INDEXINGS)}, got {cfg['ids']['indexing']!r}")
    if cfg["ids"]["start"] < 0:
        raise InputError(f"ids.start must be >= 0, got {cfg['ids']['start']}")
    check_seed(cfg["ids"]["seed"], "ids.seed")
    separator = cfg["ids"]["separator"]
    if not separator or (cfg["ids"]["indexing"] != "raw" and any(c.isdigit() for c in separator)):
        raise InputError(f"ids.separator {separator!r}: the history's ids would run together; use one without "
                         "digits, such as ', '")
    check_generative_samples(cfg["samples"])
    check_lora(cfg["lora"])
    check_train(cfg["train"])
    check_ks(cfg["eval"]["ks"])
    if int(cfg["generate"]["beams"]) < 1:
        raise InputError(f"generate.beams must be >= 1, got {cfg['generate']['beams']}")
    if cfg["generate"]["batch_size"] < 0:
        raise InputError(f"generate.batch_size must be >= 0, got {cfg['generate']['batch_size']}")
    if cfg["generate"]["search"] not in ("cached", "transformers"):
        raise InputError(f"generate.search: expected cached or transformers, got {cfg['generate']['search']!r}")
    check_decoding(cfg["generate"])
    lp = cfg["generate"]["length_penalty"]
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or lp != lp:
        raise InputError(f"generate.length_penalty: expected a number, got {lp!r}")


def train_step(ctx: RunContext, backbone: Backbone, examples, valid_examples) -> dict:
    """Step 1: LoRA on (prompt, identifier) pairs (resumable), best epoch by the valid answer loss."""
    train = ctx.config["train"]
    evaluate = answer_loss(backbone, valid_examples, int(train["batch_size"]), bool(train["answer_only"]))
    return lora_step(ctx.run, backbone, examples, ctx.config["lora"], train, ctx.seed, "lora",
                     ctx.run.checkpoints / "adapter", evaluate=evaluate, log=lambda m: ctx.log(f"step 1: {m}"))


def run(ctx: RunContext) -> dict:
    cfg = ctx.config
    ds = ctx.dataset
    ks = check_ks(cfg["eval"]["ks"])
    split, valid, test = generative_samples(ds, cfg["samples"])
    shots = few_shot(split.train, int(cfg["train"]["shots"]) or None, ctx.seed)
    ctx.log(f"P5 with {cfg['model']['name']}: {len(shots)} shots; {len(test)} test cases (of {split.sizes()})")

    ic = cfg["ids"]
    ids = item_numbers(ds, ic["indexing"], int(ic["start"]), int(ic["seed"]), cutoff=split.train["timestamp"].max())
    clash = next((i for i in ids if ic["separator"] in i), None)
    if clash is not None:  # a history of such ids could not be read back into items
        raise InputError(f"item id {clash!r} holds ids.separator {ic['separator']!r}; choose another ids.separator "
                         f"(or ids.indexing sequential / random)")
    users = [str(u) for u in ds.users["raw_id"]]
    backbone = ctx.backbone()
    eos = backbone.tokenizer.eos_token
    p = cfg["prompt"]
    answers = id_answers(ids, p["output"], eos)
    trie = build_trie(backbone, answers)
    prompter = Prompter(p, backbone.tokenizer, p["wrapper"], p["system"], p["max_tokens"], backbone.count_tokens)
    prompts = {name: prompter.render_all(id_fields(frame, ids, users, ctx.noun, ic["separator"]))
               for name, frame in (("train", shots), ("valid", valid), ("test", test))}
    examples = [(q, answers[int(i)]) for q, i in zip(prompts["train"], shots["item"])]
    n_loss = int(cfg["train"]["valid_loss_size"])
    valid_examples = [(q, answers[int(i)]) for q, i in zip(prompts["valid"], valid["item"])][:n_loss]

    started = time.perf_counter()
    train_summary = train_step(ctx, backbone, examples, valid_examples)
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    g = cfg["generate"]
    histories = full_histories(ds, test)
    banned = {}
    if g["exclude_history"]:
        for prompt, history in zip(prompts["test"], histories):
            banned.setdefault(tuple(backbone.tokenize(prompt)), set()).update(int(i) for i in history)
    beams_items, beams_scores, returned, dead_ends = [], [], 0, 0
    if g["decoding"] != "beam":
        beams_items, beams_scores, returned = shared_decoding(ctx, backbone, prompts["test"], trie, ids, banned)
    elif g["search"] == "cached":
        found = trie_generate_step(ctx.run, backbone, prompts["test"], "test", trie, int(g["beams"]), banned,
                                   int(g["batch_size"]) or None, float(g["length_penalty"]))
        beams_items, beams_scores = found["items"], found["scores"]
        returned = sum(len(b) for b in beams_items)
    else:
        constraint = TrieConstraint(trie, backbone.tokenizer.eos_token_id, backbone.pad_id, banned)
        generated = generate_step(ctx.run, backbone, prompts["test"], "test", int(g["beams"]), trie.max_len,
                                  int(g["batch_size"]), logits_processor=constraint,
                                  length_penalty=float(g["length_penalty"]))
        eos_id = backbone.tokenizer.eos_token_id
        for texts, scores in zip(generated["texts"], generated["scores"]):
            returned += sum(1 for s in scores if s == s and s > -1e8)
            tokens = backbone.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
            items, kept = decode_beams(trie, tokens, scores, eos_id)
            beams_items.append(items)
            beams_scores.append(kept)
        dead_ends = constraint.dead_ends

    targets = torch.from_numpy(test["item"].to_numpy(np.int64).copy())
    scores = torch.full((len(test), ds.n_items), -1e30)
    for c, (items, kept) in enumerate(zip(beams_items, beams_scores)):
        if items:
            scores[c, torch.tensor(items)] = torch.tensor(kept, dtype=torch.float32)
    mask = history_mask(histories, ds.n_items) if cfg["eval"]["mask_history"] else None
    ranks = target_ranks(scores, targets, mask)
    metrics = ranking_with_intervals(ranks, ks)
    eval_seconds = time.perf_counter() - started

    n_valid_beams = sum(len(b) for b in beams_items)
    stats = {"validity": n_valid_beams / max(1, returned), "beams_per_case": n_valid_beams / max(1, len(test)),
             "target_in_beams": float(np.mean([int(t) in b for t, b in zip(targets.tolist(), beams_items)])),
             "distinct_top1": len({b[0] for b in beams_items if b}), "cases": len(test),
             "dead_ends": dead_ends, "decoding": g["decoding"]}
    stats.update(item_diagnostics([b[0] if b else -1 for b in beams_items], targets, ds.titles(),
                                  period_popularity(ds, split.train["timestamp"].max()), histories))
    ctx.log(f"generation: validity {stats['validity']:.3f}, {stats['beams_per_case']:.1f} beams per case, target in "
            f"beams {stats['target_in_beams']:.3f}")
    titles = ds.titles()
    # "user": the dataset's user index, as in every next-item run's cases (report --paired, fairness-groups)
    rows = [{"user": int(u), "user_id": users[int(u)], "target": titles[int(t)], "target_id": ids[int(t)], "rank": float(r),
             "beams": [{"id": ids[i], "title": titles[i], "score": s} for i, s in zip(items[:10], kept[:10])]}
            for u, t, r, items, kept in zip(test["user"], targets.tolist(), ranks.tolist(), beams_items, beams_scores)]
    ctx.run.write_json("cases-test.json", rows)
    warnings = []
    if int(g["beams"]) < max(ks):
        warnings.append(f"generate.beams={g['beams']} is below the largest K ({max(ks)}): items past the beams tie "
                        f"at the bottom, so metrics @K > {g['beams']} add little")
    warnings += next_item_warnings(cfg, len(shots), len(valid), len(test), histories, targets, ds.n_items, ks)
    return {
        "test": metrics, "valid": {},
        "seconds": {"train": train_seconds, "eval": eval_seconds},
        "generation": stats,
        "examples": rows[:10],
        "warnings": warnings,
        "ids": {"indexing": ic["indexing"], "tokens_per_id": float(np.mean([len(s) for s in trie.items])) - 1,
                "examples": [[titles[i], ids[i]] for i in range(min(5, ds.n_items))]},
        "train_summary": {k: train_summary.get(k) for k in ("steps", "epochs_run", "best_score", "best_step",
                                                            "tokens", "history")},
        "samples": {**split.sizes(), "shots": len(shots), "valid_cases": len(valid), "test_cases": len(test)},
    }


def _report(metrics: dict) -> str:
    gen = metrics.get("generation", {})
    lines = []
    if gen:
        lines += [f"Constrained generation (test): validity {gen['validity']:.3f} (returned beams that are catalogue "
                  f"identifiers), {gen['beams_per_case']:.1f} items per case, target among the beams in "
                  f"{gen['target_in_beams']:.3f} of {gen['cases']} cases, {gen['distinct_top1']} distinct top-1 "
                  f"items.", ""]
        if "distinct_items" in gen:
            lines += [*diagnostics_lines(gen), ""]
    examples = metrics.get("examples", [])
    if examples:
        lines += ["| target | top beams | rank |", "|---|---|---|"]
        lines += [f"| {e['target']} ({e['target_id']}) | "
                  + ", ".join(f"{b['id']}" for b in e["beams"][:5]) + f" | {e['rank']:g} |" for e in examples]
    return "\n".join(lines) + "\n"


METHODS = [Method("p5", "P5 sequential recommendation: items as number IDs in the prompt, LoRA on the target's ID, "
                        "ranking by trie-constrained beam search over the catalogue's IDs.",
                  DEFAULTS, run, report=_report, validate=validate, nullable=MODEL_NULLABLE,
                  needs=lambda c: Needs.next_item(c["samples"]["history_len"], c["samples"]["targets"] == "liked",
                                                  max(c["eval"]["ks"])),
                  smoke={"model.name": "tiny-random", "train.shots": 8, "train.epochs": 1, "train.valid_loss_size": 4,
                         "samples.valid_size": 6, "samples.test_size": 8, "generate.beams": 4, "eval.ks": [1, 4]})]

_TABLE = "Generative baselines (P5, GPT4Rec) beside BIGRec"
EXPERIMENTS = [
    # ~2-3 min on the shared 2-core CPU with SmolLM2-135M
    Experiment("p5", "p5", table=_TABLE, profiles=("quick",),
               quick={"train.shots": 64, "train.epochs": 1, "train.valid_loss_size": 0, "samples.valid_size": 16,
                      "samples.test_size": 32, "generate.beams": 10, "eval.ks": [1, 5, 10]}),
    # the benchmark's setting (docs/benchmarks-generative.md), BIGRec's samples and test cases
    Experiment("p5-1024", "p5", table=_TABLE, profiles=("full",),
               full={"train.shots": 1024, "train.epochs": 1, "train.valid_loss_size": 32, "samples.valid_size": 100,
                     "samples.test_size": 200, "generate.beams": 20}),
]
