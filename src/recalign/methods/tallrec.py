"""TALLRec: few-shot LoRA instruction tuning for Yes/No recommendation (Bao et al., RecSys '23).

Per training seed: draw N samples from the training period, add fresh LoRA adapters, train on the answer
tokens ("Yes." / "No."), early-stop on validation AUC, score the test samples with logit(Yes) - logit(No).
Reported: AUC/UAUC on all test samples and on the warm / cold slices (warm = user and target item both
seen in the training period), mean and std over seeds.

Cross-domain (`cross.domains` set, e.g. two disjoint genre groups or two datasets): train on each domain,
test on every domain; the report shows the train-domain x test-domain AUC matrix.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from recalign.data import Needs, few_shot
from recalign.errors import InputError
from recalign.llm import (LORA_CONFIG, MODEL_CONFIG, MODEL_NULLABLE, Backbone, Prompter, check_lora, check_model,
                          check_train, check_yes_no, lora_step, train_section)
from recalign.llm.prompts import check_template
from recalign.methods.api import Experiment, Method, RunContext
from recalign.report.markdown import metrics_table, signed_span
from recalign.report.summary import with_intervals
from recalign.tasks.ctr import (TALLREC_PROMPT, TALLREC_SAMPLES, check_tallrec_samples, counting_baselines, counting_rows,
                                ctr_report, domain_datasets, fewer_than_asked, mean_std, paired_ctr_report,
                                paired_with_counting, tallrec_protocol)
from recalign.tasks.text import SAMPLE_FIELDS, frame_fields

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "prompt": copy.deepcopy(TALLREC_PROMPT),
    "samples": copy.deepcopy(TALLREC_SAMPLES),
    "lora": copy.deepcopy(LORA_CONFIG),
    "train": train_section(
        shots=64,  # N training samples drawn from the training period (0 = all)
        seeds=1,  # number of training seeds (seed, seed+1, ...); metrics are mean (and *_std) over them
        lr=1e-3,
        loss="lm",  # lm: causal-LM loss on the answer tokens | bce: BCE on logit(Yes) - logit(No)
        answer_only=True,  # false: LM loss on every token, as the reference code does
    ),
    "cross": {
        "domains": [],  # e.g. ["genre:Action|Thriller", "genre:Comedy|Romance"] or dataset names/paths
    },
}


def validate(config: dict) -> None:
    check_model(config["model"], training=True)
    check_template(config["prompt"], "prompt", SAMPLE_FIELDS, uses_one_of=("target",))
    check_yes_no(config["prompt"]["yes"], config["prompt"]["no"])
    check_tallrec_samples(config["samples"])
    check_lora(config["lora"])
    check_train(config["train"])
    if config["train"]["seeds"] < 1:
        raise InputError(f"train.seeds must be >= 1, got {config['train']['seeds']}")


def prompts_of(backbone: Backbone, prompt: dict, ds, frame, noun: str) -> list[str]:
    prompter = Prompter(prompt, backbone.tokenizer, prompt["wrapper"], prompt["system"], prompt["max_tokens"],
                        backbone.count_tokens)
    return prompter.render_all(frame_fields(frame, ds.titles(), noun))


def train_and_score(ctx: RunContext, backbone: Backbone, ds, train_pool, eval_sets: dict, seed: int,
                    tag: str, references: dict | None = None) -> dict:
    """Train fresh LoRA on N samples of `train_pool` (seed), early-stop on eval_sets["valid"], score every
    eval set; `references`: other scores of the test set, each paired with this model's. Resumable: a
    finished tag is read back from its checkpoint."""
    done = ctx.run.load_checkpoint(f"result-{tag}")
    if done is not None:
        ctx.log(f"{tag}: finished earlier, read back from its checkpoint")
        return done
    cfg = ctx.config
    prompt_cfg, train_cfg = cfg["prompt"], cfg["train"]
    yes, no = prompt_cfg["yes"], prompt_cfg["no"]
    domain = cfg["data"].get("domain")
    shots = few_shot(train_pool, int(train_cfg["shots"]) or None, seed)
    if shots["label"].nunique() < 2:
        ctx.log(f"{tag}: warning: all {len(shots)} training samples have the same label")
    answers = [yes if label else no for label in shots["label"]]
    examples = list(zip(prompts_of(backbone, prompt_cfg, ds, shots, domain or ds.domain), answers))
    prompts = {name: prompts_of(backbone, prompt_cfg, ds_e, frame, domain or ds_e.domain)
               for name, (ds_e, frame) in eval_sets.items()}
    valid_frame = eval_sets["valid"][1]
    best = {"auc": None, "scores": None}

    def evaluate() -> float:
        scores = backbone.score_yes_no(prompts["valid"], yes, no).numpy()
        value = ctr_report(valid_frame, scores, intervals=False)["auc"]
        value = -1.0 if np.isnan(value) else value
        if best["auc"] is None or value > best["auc"]:
            best["auc"], best["scores"] = value, scores
        return value

    started = time.perf_counter()
    result = lora_step(ctx.run, backbone, examples, cfg["lora"], train_cfg, seed, f"train-{tag}",
                       ctx.run.checkpoints / f"adapter-{tag}", evaluate=evaluate,
                       log=lambda m: ctx.log(f"{tag}: {m}"), yes=yes, no=no)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    metrics = {}
    # the best evaluation's valid scores, when this process made it; after a resume the best may be an earlier
    # process's, and the valid set is scored again with the restored best adapter (as an uninterrupted run's)
    best_here = best["scores"] is not None and best["auc"] == result.get("best_score")
    for name, (_, frame) in eval_sets.items():
        if name == "valid" and best_here:
            scores = best["scores"]
        else:
            scores = backbone.score_yes_no(prompts[name], yes, no, progress=f"{tag} {name}").numpy()
        metrics[name] = ctr_report(frame, scores)
        ctx.write_predictions(f"predictions-{tag}-{name}.json", frame, scores)
        if name == "test" and references:
            paired = paired_with_counting("tallrec", frame, scores, references)
    eval_seconds = time.perf_counter() - started
    out = {"tag": tag, "seed": seed, "shots": len(shots), "metrics": metrics,
           "train": result, "paired": paired if references else {},
           "seconds": {"train": train_seconds, "eval": eval_seconds}}
    ctx.run.save_checkpoint(f"result-{tag}", out)
    summary = ", ".join(f"{n} AUC {m['auc']:.4f}" for n, m in metrics.items())
    ctx.log(f"{tag}: {len(shots)} shots, {result['steps']} steps in {train_seconds:.0f}s; {summary}")
    return out


def _aggregate(rows: list[dict], split: str) -> dict:
    keys = [k for k in rows[0]["metrics"][split] if all(k in r["metrics"][split] for r in rows)]
    out = {}
    for key in keys:
        values = [r["metrics"][split][key] for r in rows]
        if key.endswith("_ci"):  # an interval is per seed (in per_seed); one seed: it is the run's
            if len(rows) == 1:
                out[key] = values[0]
            continue
        if key.startswith(("n", "uauc_skipped")):
            out[key] = values[0] if len(set(values)) == 1 else float(np.mean(values))
            continue
        mean, std = mean_std(values)
        out[key] = mean
        if len(rows) > 1 and key in ("auc", "uauc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold"):
            out[f"{key}_std"] = std
    return out


def run(ctx: RunContext) -> dict:
    cfg = ctx.config
    n_seeds = int(cfg["train"]["seeds"])
    if cfg["cross"]["domains"]:
        return _run_cross(ctx)
    ds = ctx.dataset
    data = tallrec_protocol(ds, cfg["samples"])
    backbone = ctx.backbone()
    ctx.log(f"TALLRec with {cfg['model']['name']}: {cfg['train']['shots']} shots x {n_seeds} seed(s); "
            f"{len(data.valid)} valid / {len(data.test)} test samples")
    floor = counting_baselines(data.train, data.test)  # what counting alone gets on the same test samples
    rows = [train_and_score(ctx, backbone, ds, data.train,
                            {"valid": (ds, data.valid), "test": (ds, data.test)}, ctx.seed + k, f"seed{ctx.seed + k}",
                            references=floor)
            for k in range(n_seeds)]
    return {
        "test": _aggregate(rows, "test"), "valid": _aggregate(rows, "valid"),
        "seconds": {"train": sum(r["seconds"]["train"] for r in rows),
                    "eval": sum(r["seconds"]["eval"] for r in rows)},
        "shots": rows[0]["shots"],  # drawn; fewer than train.shots when the training period is smaller
        "warnings": fewer_than_asked(cfg, rows[0]["shots"], len(data.valid), len(data.test)),
        "per_seed": [{"seed": r["seed"], "shots": r["shots"], "test": r["metrics"]["test"],
                      "valid": r["metrics"]["valid"], "steps": r["train"]["steps"],
                      "best_step": r["train"]["best_step"], "history": r["train"]["history"],
                      "paired": r.get("paired", {})} for r in rows],
        "baselines": counting_rows(floor, data.test),
        "samples": {**data.sizes(), "valid_scored": len(data.valid), "test_scored": len(data.test)},
    }


def _run_cross(ctx: RunContext) -> dict:
    """Train on each domain, test on each domain: AUC matrix [train domain][test domain]."""
    cfg = ctx.config
    specs = list(cfg["cross"]["domains"])
    if len(specs) < 2 or len(set(specs)) != len(specs):
        raise InputError(f"cross.domains: need at least two distinct domains, got {specs}")
    domains = domain_datasets(ctx.dataset, specs, cfg["data"])
    prepared = [(name, ds, tallrec_protocol(ds, cfg["samples"])) for name, ds in domains]
    backbone = ctx.backbone()
    n = len(prepared)
    auc = [[float("nan")] * n for _ in range(n)]
    uauc = [[float("nan")] * n for _ in range(n)]
    auc_ci = [[None] * n for _ in range(n)]
    train_seconds = eval_seconds = 0.0
    for i, (name, ds, data) in enumerate(prepared):
        eval_sets = {"valid": (ds, data.valid)}
        eval_sets.update({f"test{j}": (ds_j, data_j.test) for j, (_, ds_j, data_j) in enumerate(prepared)})
        per_seed = [train_and_score(ctx, backbone, ds, data.train, eval_sets, ctx.seed + k,
                                    f"domain{i}-seed{ctx.seed + k}") for k in range(int(cfg["train"]["seeds"]))]
        for j in range(n):
            auc[i][j] = mean_std([r["metrics"][f"test{j}"]["auc"] for r in per_seed])[0]
            uauc[i][j] = mean_std([r["metrics"][f"test{j}"]["uauc"] for r in per_seed])[0]
            auc_ci[i][j] = per_seed[0]["metrics"][f"test{j}"].get("auc_ci")
        train_seconds += sum(r["seconds"]["train"] for r in per_seed)
        eval_seconds += sum(r["seconds"]["eval"] for r in per_seed)
        ctx.log(f"trained on {name}: test AUC " + ", ".join(f"{prepared[j][0]} {auc[i][j]:.4f}" for j in range(n)))
    off = [auc[i][j] for i in range(n) for j in range(n) if i != j]
    off_u = [uauc[i][j] for i in range(n) for j in range(n) if i != j]
    diag = [auc[i][i] for i in range(n)]
    return {
        "test": {"auc": float(np.nanmean(off)), "uauc": float(np.nanmean(off_u)), "auc_in_domain": float(np.nanmean(diag))},
        "valid": {},
        "seconds": {"train": train_seconds, "eval": eval_seconds},
        "cross_domain": {"domains": specs, "auc": auc, "uauc": uauc, "auc_ci": auc_ci,  # the first seed's
                         "paired": _in_minus_cross_domain(ctx, prepared, ctx.seed),
                         "baselines": {name: counting_rows(counting_baselines(data.train, data.test), data.test)
                                       for name, _, data in prepared},
                         "samples": {name: data.sizes() for name, _, data in prepared}},
    }


def _in_minus_cross_domain(ctx: RunContext, prepared: list, seed: int) -> dict:
    """Per test domain: the in-domain model minus each model trained on another domain, on the same test
    samples (the first seed's scores, from the predictions files), with paired 95% intervals."""
    import json

    def scores(i: int, j: int) -> np.ndarray:
        path = ctx.run.path / f"predictions-domain{i}-seed{seed}-test{j}.json"
        return np.asarray(json.loads(path.read_text())["score"], dtype=np.float64)

    out = {}
    for j, (name_j, _, data_j) in enumerate(prepared):
        for i, (name_i, _, _) in enumerate(prepared):
            if i != j:
                out[f"test {name_j}: trained on it - trained on {name_i}"] = paired_ctr_report(
                    data_j.test, scores(j, j), scores(i, j))
    return out


def _report(metrics: dict) -> str:
    lines = []
    cross = metrics.get("cross_domain")
    if cross:
        names = [name.replace("|", "\\|") for name in cross["domains"]]  # genre lists hold table pipes
        lines += ["### Cross-domain AUC (rows: trained on, columns: tested on)", "",
                  "| train \\ test | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        spans = cross.get("auc_ci") or [[None] * len(names) for _ in names]
        for name, row, row_ci in zip(names, cross["auc"], spans):
            cells = [with_intervals({"auc": v, "auc_ci": ci}, ["auc"])["auc"] for v, ci in zip(row, row_ci)]
            lines.append(f"| {name} | " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells)
                         + " |")
        for name, rows in cross.get("baselines", {}).items():
            lines.append(f"\ncounting baselines on {name.replace('|', ', ')}'s test samples: " + "; ".join(
                f"{ref} AUC {with_intervals(m['test'], ['auc'])['auc']}" for ref, m in rows.items()))
        for pair, difference in cross.get("paired", {}).items():
            d = difference.get("auc") or {"difference": float("nan"), "ci": None}
            lines.append(f"\n{pair}: AUC {d['difference']:+.4f} {signed_span(d['ci'])} (paired, same test samples)")
    for row in metrics.get("per_seed", []):
        if not lines:
            lines += ["### Per seed", "", "| seed | shots | steps | best step | valid AUC | test AUC | test UAUC |",
                      "|---|---|---|---|---|---|---|"]
        lines.append(f"| {row['seed']} | {row['shots']} | {row['steps']} | {row['best_step']} | "
                     f"{row['valid'].get('auc', float('nan')):.4f} | {row['test']['auc']:.4f} | "
                     f"{row['test']['uauc']:.4f} |")
    baselines = metrics.get("baselines", {})
    if baselines:
        paired = (metrics.get("per_seed") or [{}])[0].get("paired", {})
        column = "TALLRec − baseline, AUC (first seed, paired)"
        rows = []
        for name, m in baselines.items():
            d = paired.get(f"tallrec - {name}", {}).get("auc")
            rows.append((name, {**with_intervals(m["test"], ["auc", "uauc"]),
                                column: f"{d['difference']:+.4f} {signed_span(d['ci'])}" if d else None}))
        lines += ["", "### Counting baselines on the same test samples (no LLM; `tasks.ctr.counting_baselines`)", "",
                  metrics_table(rows, ["auc", "uauc", column])]
    return "\n".join(lines) + ("\n" if lines else "")


METHODS = [Method("tallrec", "Few-shot LoRA instruction tuning with Yes/No answers (TALLRec).", DEFAULTS, run,
                  report=_report, validate=validate, nullable=MODEL_NULLABLE,
                  needs=lambda c: Needs.ctr(c["samples"]["history_len"]),
                  smoke={"model.name": "tiny-random", "samples.valid_size": 8, "samples.test_size": 12,
                         "train.shots": 8, "train.epochs": 1})]

_TABLE = "TALLRec: ICL vs instruction tuning (AUC)"
# per shot count (bench/tallrec.py uses it too): learning is step-limited at lr 1e-3 and batch 4, so fewer shots
# get more epochs; validation at each epoch end and every `eval_every` optimizer steps (16 shots = 4 steps per
# epoch, so eval_every 8 never fires: it validates at each epoch end)
SCHEDULE = {16: {"train.epochs": 12, "train.eval_every": 8},
            64: {"train.epochs": 5, "train.eval_every": 16},
            256: {"train.epochs": 3, "train.eval_every": 32},
            1024: {"train.epochs": 2, "train.eval_every": 64}}
# the full profile's Yes/No test set: the same 2,000 samples (subset_seed 0) for TALLRec and ICL; a 95% interval
# on ~2,000 samples is about +-0.02 AUC, on the quick profile's 200 about +-0.07
FULL_TEST_SIZE = 2000
EXPERIMENTS = [
    # quick: one shot count, one epoch, one seed, small valid/test subsets (~4 min on an idle 2-core CPU)
    Experiment("tallrec", "tallrec", table=_TABLE, profiles=("quick",),
               quick={"train.shots": 256, "train.seeds": 1, "train.epochs": 1, "samples.test_size": 200,
                      "samples.valid_size": 32}),
    *[Experiment(f"tallrec-{n}", "tallrec", table=_TABLE, profiles=("full",),
                 full={"train.shots": n, "train.seeds": 3, "samples.test_size": FULL_TEST_SIZE, "samples.valid_size": 128,
                       **SCHEDULE[n]})
      for n in (16, 64, 256)],
    Experiment("tallrec-cross-genre", "tallrec", table="TALLRec: cross-domain (ML-100K genre groups)",
               profiles=("full",),
               full={"cross.domains": ["genre:Action|Adventure|Sci-Fi|Thriller|War|Crime",
                                       "genre:Comedy|Romance|Children's|Musical|Animation"],
                     "train.shots": 256, "train.seeds": 1, "train.epochs": 2, "samples.test_size": FULL_TEST_SIZE,
                     "samples.valid_size": 64}),
]
