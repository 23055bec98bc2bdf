"""FaiRLLM prompt audit: does an LLM recommender change its list when the user states a sensitive
attribute? (Zhang et al., "Is ChatGPT Fair for Recommendation?", RecSys 2023.)

For each seed entity (by default the most-interacted catalogue titles) and each value of each sensitive
attribute (by default the paper's eight), the model is asked "I am {value} fan of {name}. Please provide
me with a list of {k} {noun} titles ..." and, once per entity, the neutral "I am a fan of {name}. ...".
Answers are generated greedily (resumable, `llm.generate_step`; batched, stopped at the K-th list item),
parsed into title lists, normalised and grounded to the catalogue where a title matches exactly
(`tasks.fairness`). Each sensitive list is compared with its entity's neutral list by Jaccard, SERP* and
PRAG* at every K up to `audit.k` (`eval.fairness`); per value the mean over entities, per attribute SNSR
(max - min over values) and SNSV (std over values), with percentile bootstrap intervals over entities
and a permutation test (each entity's lists shuffled among the values: the spread the values' means reach
when the value makes no difference, and p).

Any backbone (`model.name`) or a tuned run (`adapter`: a finished TALLRec/BIGRec/CoLLM run directory or
a peft adapter folder) can be audited, with the same prompts.

Reported (`test`): `jaccard@K`, `serp@K`, `prag@K` = the mean similarity to the neutral list over every
sensitive value, and per attribute `METRIC@K_snsr_ATTRIBUTE` / `METRIC@K_snsv_ATTRIBUTE` at K = audit.k.
metrics.json also holds the curves over K, the intervals, per-value means and generation statistics;
lists.json every raw answer with its parsed titles and grounded items; report.md / report.html tables and
plots (`fairness-snsr-vs-k.png`, `fairness-snsr.png`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from recalign.errors import InputError
from recalign.io import atomic_write_bytes, atomic_write_text, only_match
from recalign.llm import MODEL_CONFIG, MODEL_NULLABLE, Backbone, Prompter, check_model, generate_step
from recalign.methods.api import Experiment, Method, RunContext
from recalign.report.fairness import prompt_audit_html, prompt_audit_markdown, prompt_audit_plots
from recalign.tasks.fairness import (ENTITIES, FAIRLLM_PROMPT, MATCH_MODES, TEMPLATE_FIELDS, AuditPlan,
                                     CatalogueIndex, audit_metrics, check_entities, check_prompt, fill_template,
                                     headline_metrics, list_complete, list_keys, load_attributes, parse_list,
                                     pick_entities)

DEFAULTS = {
    "model": {**copy.deepcopy(MODEL_CONFIG), "batch_size": 16},
    # a tuned model: a finished TALLRec / BIGRec / CoLLM run directory or a peft adapter folder ("" = base model)
    "adapter": "",
    "prompt": copy.deepcopy(FAIRLLM_PROMPT),
    "entities": copy.deepcopy(ENTITIES),
    "attributes": {
        "files": ["paper"],  # built-in sets (paper, typos, ml-100k-users) or YAML files: attribute -> values
        "only": [],  # audit just these attributes of the files ([] = all)
    },
    "audit": {
        "k": 20,  # K_max: list length asked for; metrics at every K = 1..k
        "match": "title",  # title: the spec's normalisation (parentheses dropped) | title_year: keep "(1977)"
        "serp_scale": "spec",  # spec: identical lists score 1 | reference: the reference code's scale (0.274 at K=20)
        "bootstrap": 1000,  # resamples of the entities for the intervals, and shufflings for p (0 = none)
    },
    "generate": {
        "max_new_tokens": 0,  # 0 = 16 * k + 16
        "batch_size": 0,  # prompts per generate() call (0 = model.batch_size)
        "stop_at_list_end": True,  # stop a row once its K-th numbered item is complete
        "repetition_penalty": 1.0,  # 1.0 = none (the paper: ChatGPT with presence/frequency penalties 0)
        "block": 64,  # prompts between generation checkpoints
    },
}


def validate(cfg: dict) -> None:
    check_model(cfg["model"])
    check_prompt(cfg["prompt"])
    check_entities(cfg["entities"])
    selected_attributes(cfg["attributes"])
    audit, gen = cfg["audit"], cfg["generate"]
    k = audit["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"audit.k: expected an integer >= 1, got {k!r}")
    if audit["match"] not in MATCH_MODES:
        raise InputError(f"audit.match: expected one of {', '.join(MATCH_MODES)}, got {audit['match']!r}")
    if audit["serp_scale"] not in ("spec", "reference"):
        raise InputError(f"audit.serp_scale: expected 'spec' or 'reference', got {audit['serp_scale']!r}")
    if audit["bootstrap"] < 0:
        raise InputError(f"audit.bootstrap: expected an integer >= 0, got {audit['bootstrap']}")
    for key in ("max_new_tokens", "batch_size"):
        if gen[key] < 0:
            raise InputError(f"generate.{key}: expected an integer >= 0 (0 = automatic), got {gen[key]}")
    if isinstance(gen["repetition_penalty"], bool) or gen["repetition_penalty"] <= 0:
        raise InputError(f"generate.repetition_penalty: expected a number > 0, got {gen['repetition_penalty']!r}")
    if gen["block"] < 1:
        raise InputError(f"generate.block: expected an integer >= 1, got {gen['block']}")
    if cfg["adapter"]:
        adapter_dir(cfg["adapter"], cfg["model"]["name"])


def selected_attributes(section: dict) -> dict[str, list[str]]:
    """The attributes of `attributes.files`, restricted to `attributes.only` when given."""
    attributes = load_attributes(section["files"])
    only = section["only"]
    if not isinstance(only, list) or not all(isinstance(a, str) for a in only):
        raise InputError(f"attributes.only: expected a list of attribute names, got {only!r}")
    unknown = [a for a in only if a not in attributes]
    if unknown:
        raise InputError(f"attributes.only: {unknown[0]!r} is not an attribute of {', '.join(section['files'])} "
                         f"(known: {', '.join(attributes)})")
    return {a: v for a, v in attributes.items() if not only or a in only}


def adapter_dir(path: str, model_name: str) -> Path:
    """A peft adapter folder, or the one adapter of a finished run directory (checkpoints/adapter,
    checkpoints/adapter-<seed>, step1_adapter). The run's model.name must be the audited model's."""
    root = Path(path)
    if (root / "adapter_config.json").is_file():
        return root
    if not root.is_dir():
        raise InputError(f"adapter: {path} is neither a peft adapter folder nor a run directory")
    found = only_match(root, ("checkpoints/adapter*/adapter_config.json", "step1_adapter/adapter_config.json"),
                       f"adapter: {path} holds no adapter (checkpoints/adapter*/ or step1_adapter/)",
                       f"adapter: {path} holds several adapters").parent
    config = root / "config.yaml"
    if config.is_file():
        import yaml

        try:
            name = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("name")
        except yaml.YAMLError:
            raise InputError(f"{config}: invalid YAML") from None
        if name and name != model_name:
            raise InputError(f"adapter: {path} was trained on model.name={name}, this audit uses {model_name}")
    return found


# ------------------------------------------------------------------------------------- generation
def list_end_criteria(tokenizer, k: int):
    """A stopping criterion: a row is done once its text holds the K-th numbered item and the line after
    it has started (`tasks.fairness.list_complete`). Only the last tokens of each row are decoded."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    import torch

    class ListEnd(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tails = tokenizer.batch_decode(input_ids[:, -40:], skip_special_tokens=True)
            return torch.tensor([list_complete(t, k) for t in tails], device=input_ids.device)

    return StoppingCriteriaList([ListEnd()])


def generate_lists(ctx: RunContext, backbone: Backbone, prompts: list[str], k: int) -> tuple[list[str], dict]:
    gen = ctx.config["generate"]
    max_new = int(gen["max_new_tokens"]) or 16 * k + 16
    done_before = len((ctx.run.load_checkpoint("generations-fairllm") or {"texts": []})["texts"])
    extra = {"stopping_criteria": list_end_criteria(backbone.tokenizer, k)} if gen["stop_at_list_end"] else {}
    if float(gen["repetition_penalty"]) != 1.0:
        extra["repetition_penalty"] = float(gen["repetition_penalty"])
    started = time.perf_counter()
    state = generate_step(ctx.run, backbone, prompts, "fairllm", 1, max_new, int(gen["batch_size"]) or None,
                          block=int(gen["block"]), **extra)
    seconds = time.perf_counter() - started
    new = len(prompts) - min(done_before, len(prompts))
    return [row[0] for row in state["texts"]], {"seconds": seconds, "generated_here": new,
                                               "from_checkpoint": len(prompts) - new, "max_new_tokens": max_new,
                                               "prompts_per_second": new / seconds if new and seconds > 0 else None}


def generation_stats(plan: AuditPlan, texts: list[str], keys: list[list[str]], index: CatalogueIndex, k: int,
                     timing: dict) -> dict:
    parsed = [bool(x) for x in keys]
    unparsable_by_value: dict[str, int] = {}
    for (entity, value), ok in zip(plan.units(), parsed):
        if not ok:
            unparsable_by_value[value] = unparsable_by_value.get(value, 0) + 1
    listed = [key for row in keys for key in row[:k]]
    lengths = [min(len(row), k) for row in keys]
    return {
        "prompts": len(texts), "parsed_share": float(np.mean(parsed)) if parsed else float("nan"),
        "unparsable": int(len(parsed) - sum(parsed)), "unparsable_by_value": unparsable_by_value,
        "entities_without_neutral_list": [plan.entities[e] for e in range(len(plan.entities))
                                          if not keys[plan.index(e, plan.neutral)]],
        "mean_titles": float(np.mean(lengths)) if lengths else float("nan"),
        "full_lists_share": float(np.mean([n >= k for n in lengths])) if lengths else float("nan"),
        "grounded_share": float(np.mean([index.ground(key) >= 0 for key in listed])) if listed else float("nan"),
        "distinct_titles": len(set(listed)),
        **timing,
    }


def unparsed_warnings(generation: dict, entities: int, used: int) -> list[str]:
    """Answers that held no list of titles, said: with no neutral list at all every metric is undefined."""
    unparsed, prompts = generation["unparsable"], generation["prompts"]
    if not unparsed:
        return []
    if used == 0:
        return [f"no neutral prompt of the {entities} entities gave a list of titles ({unparsed} of {prompts} answers "
                f"unparsable): every metric is undefined; lists.json holds the answers"]
    return [f"{unparsed} of {prompts} answers held no list of titles (lists.json); the metrics rest on the others"
            + (f", {used} of {entities} entities" if used < entities else "")]


def write_lists(ctx: RunContext, plan: AuditPlan, texts: list[str], keys: list[list[str]], index: CatalogueIndex,
                titles: list[str]) -> list[dict]:
    rows = []
    for (entity, value), text, row in zip(plan.units(), texts, keys):
        items = [index.ground(key) for key in row]
        rows.append({"entity": entity, "value": value, "text": text, "titles": parse_list(text), "keys": row,
                     "items": items, "grounded": [titles[i] if i >= 0 else None for i in items]})
    ctx.run.write_json("lists.json", rows)
    first = plan.entities[0] if plan.entities else None
    return [{"value": r["value"], "titles": r["titles"]} for r in rows if r["entity"] == first][:12]


# ---------------------------------------------------------------------------------------------- run
def run(ctx: RunContext) -> dict:
    cfg, ds = ctx.config, ctx.dataset
    k = int(cfg["audit"]["k"])
    plan = AuditPlan(pick_entities(ds, cfg["entities"], ctx.seed), selected_attributes(cfg["attributes"]),
                     " ".join(cfg["prompt"]["neutral"].split()))
    ctx.log(f"FaiRLLM audit: {len(plan.entities)} entities x ({len(plan.values) - 1} values + neutral) = "
            f"{len(plan)} prompts, K = {k}, model {cfg['model']['name']}"
            + (f" + adapter {cfg['adapter']}" if cfg["adapter"] else ""))
    backbone = ctx.backbone()
    if cfg["adapter"]:
        backbone.load_adapter(adapter_dir(cfg["adapter"], cfg["model"]["name"]))
    p, noun = cfg["prompt"], ctx.noun
    system = fill_template(p["system"], "prompt.system", {**TEMPLATE_FIELDS, "noun": noun, "k": k}) if p["system"] else ""
    prompter = Prompter({"instruction": p["template"], "input": ""}, backbone.tokenizer, p["wrapper"], system)
    prompts = [prompter.render(fields) for fields in plan.fields(k, noun)]

    texts, timing = generate_lists(ctx, backbone, prompts, k)
    started = time.perf_counter()
    with_year = cfg["audit"]["match"] == "title_year"
    keys = [list_keys(t, with_year) for t in texts]
    titles = ds.titles()
    index = CatalogueIndex(titles, with_year)
    attributes = audit_metrics(plan, keys, k, cfg["audit"]["serp_scale"], int(cfg["audit"]["bootstrap"]), ctx.seed)
    generation = generation_stats(plan, texts, keys, index, k, timing)
    examples = write_lists(ctx, plan, texts, keys, index, titles)
    used = len(plan.entities) - len(generation["entities_without_neutral_list"])
    result = {
        "test": headline_metrics(attributes, k), "valid": {},
        "audit": {"model": cfg["model"]["name"], "adapter": cfg["adapter"], "k": k,
                  "serp_scale": cfg["audit"]["serp_scale"], "match": cfg["audit"]["match"], "bootstrap": int(cfg["audit"]["bootstrap"]),
                  "entities": len(plan.entities),
                  "entities_used": used,
                  "values": len(plan.values) - 1, "prompts": len(plan), "attribute_files": cfg["attributes"]["files"],
                  "entity_names": plan.entities},
        "attributes": attributes, "generation": generation, "examples": examples,
        "warnings": unparsed_warnings(generation, len(plan.entities), used),
    }
    plots = prompt_audit_plots(result)
    for name, png in plots.items():
        atomic_write_bytes(ctx.run.path / name, png)
    result["plots"] = list(plots)
    atomic_write_text(ctx.run.path / "report.html",
                      prompt_audit_html(result, plots, f"FaiRLLM audit: {cfg['model']['name']} on {ctx.dataset_name}"))
    ctx.log(f"generated {timing['generated_here']} answers in {timing['seconds']:.1f}s; "
            + ", ".join(f"{m} {v:.3f}" if v == v else f"{m} undefined"
                        for m, v in result["test"].items() if "_sn" not in m))
    result["seconds"] = {"train": 0.0, "eval": timing["seconds"] + time.perf_counter() - started,
                         "generate": timing["seconds"]}
    return result


def _report(metrics: dict) -> str:
    return prompt_audit_markdown(metrics)


METHODS = [Method("fairllm", "FaiRLLM prompt audit: how far an LLM's top-K list moves from the neutral one when the "
                             "user states a sensitive attribute (Jaccard/SERP*/PRAG*, SNSR/SNSV).",
                  DEFAULTS, run, report=_report, validate=validate, nullable=MODEL_NULLABLE,
                  smoke={"model.name": "tiny-random", "entities.count": 2, "attributes.files": ["typos"],
                         "audit.k": 3, "audit.bootstrap": 20, "generate.max_new_tokens": 12,
                         # the random tiny model repeats one token greedily; the penalty makes it write text
                         "generate.repetition_penalty": 3.0})]

_TABLE = "FaiRLLM: prompt audit (SNSR over sensitive values; lower = fairer)"
EXPERIMENTS = [
    # 3 movies x (gender and race: 8 values + neutral) = 27 prompts at K = 10: about 2 min on the loaded 2-core
    # CPU (0.2 prompts/s there); a smoke test of the pipeline, far too small for conclusions
    Experiment("fairllm", "fairllm", table=_TABLE, profiles=("quick",),
               quick={"entities.count": 3, "audit.k": 10, "attributes.only": ["gender", "race"]}),
    # docs/benchmarks-fairness.md: 20 movies x gender and race at K = 10 (14 min on the loaded CPU)
    Experiment("fairllm-20", "fairllm", table=_TABLE, profiles=("full",),
               full={"entities.count": 20, "audit.k": 10, "attributes.only": ["gender", "race"]}),
    # the paper's movie setting at K = 20 on 100 entities (hours on a CPU)
    Experiment("fairllm-100", "fairllm", table=_TABLE, profiles=("full",),
               full={"entities.count": 100, "audit.k": 20}),
]
