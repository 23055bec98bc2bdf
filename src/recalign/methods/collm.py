"""CoLLM: collaborative embeddings as tokens (Zhang et al., 2023).

A pre-trained CF model (MF, LightGCN or SASRec; frozen by default) gives a user vector (MF/LightGCN: the
user's embedding; SASRec: the encoding of the user's liked-item history) and an item vector; the CIE
(Linear(d, 10d) → ReLU → Linear(10d, hidden·k)) maps each to k token embeddings that replace the input
embeddings at the <UserID> / <TargetItemID> placeholders. Score = logit("Yes") − logit("No") at the
answer position, loss = binary cross-entropy.

Two steps: (1) LoRA only, on the text prompt without IDs (= TALLRec on CoLLM's prompt); (2) CIE only, LoRA
frozen, on the ID prompt. Data: CoLLM's CTR protocol (`recalign.tasks.ctr.collm_protocol`): every interaction a
sample, history = last 10 liked items, split on the time axis, AUC / UAUC on all, warm and cold cases.

Besides CoLLM's own metrics the run reports, on the same test cases: the CF model alone in CTR mode
(`baselines.cf`), the step-1 model (`baselines.step1`, TALLRec), optionally the base LLM zero-shot
(`baselines.icl`) and CoLLM with zeroed CF embeddings (`ablation.zero_cf`).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from recalign.cf.checks import check_model_settings, check_train_settings
from recalign.errors import InputError
from recalign.eval.metrics import check_metric_name
from recalign.llm import (CIE, LORA_CONFIG, MODEL_CONFIG, MODEL_NULLABLE, Backbone, Prompter, Scorer, TrainConfig,
                          check_lora, check_model, check_train, check_yes_no, lora_step, train_section,
                          train_slot_modules)
from recalign.llm.prompts import check_template
from recalign.data import Needs
from recalign.methods.api import Experiment, Method, RunContext
from recalign.report.markdown import signed_span
from recalign.tasks.ctr import (COLLM_NULLABLE, COLLM_PROTOCOL, check_collm_protocol, collm_protocol, counting_baselines,
                                counting_rows, ctr_report, paired_ctr_report, summary_line, valid_auc)
from recalign.tasks.text import SAMPLE_FIELDS, check_titles_free_of, frame_fields

CF_MODELS = ("mf", "lightgcn", "sasrec")
INSTRUCTION = 'Answer with "Yes" or "No".'


DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "data_protocol": copy.deepcopy(COLLM_PROTOCOL),
    "prompt": {
        "wrapper": "auto",  # auto | chat | alpaca | plain
        "system": "",  # chat system message ("" = empty; null = the tokenizer's default)
        # CoLLM's prompt, made compact (every token costs CPU time): the text prompt for step 1 (and the
        # TALLRec / ICL rows), the same prompt with the two placeholders for step 2
        "text": {"instruction": INSTRUCTION,
                 "input": 'A user liked these {nouns}: {liked}. Will the user enjoy the {noun} titled "{target}"?'},
        "ids": {"instruction": INSTRUCTION,
                "input": ('A user liked these {nouns}: {liked}. The user has the feature <UserID>. Will the user '
                          'enjoy the {noun} titled "{target}" with the feature <TargetItemID>?')},
        "user_slot": "<UserID>",
        "item_slot": "<TargetItemID>",
        "empty_history": "none",  # rendered in place of {liked} when the user has no liked item yet
        "yes": "Yes",
        "no": "No",
    },
    "cf": {
        "model": "mf",  # mf | lightgcn | sasrec
        "params": {},  # the CF model's hyper-parameters (e.g. {embedding_size: 64})
        "train": {"epochs": 200, "batch_size": 2048, "lr": 0.001, "weight_decay": 0.0, "objective": "",
                  "patience": 10, "valid_metric": "auc", "max_minutes": 0.0},  # objective "" = bce if supported
        "valid": "all",  # early-stop the CF model on the AUC of all valid samples (reference) or only the warm ones
        "tune": False,  # also tune the CF model in step 2 (default: frozen)
    },
    "cie": {"tokens": 1, "hidden_mult": 10},
    "lora": copy.deepcopy(LORA_CONFIG),
    # step 1 (LoRA on the text prompt); epochs 0 = skip; init_from = a peft adapter dir or a CoLLM run dir
    "step1": train_section(epochs=1, grad_accum=2, lr=1e-3, patience=2, init_from=None, loss="bce"),
    "step2": train_section(epochs=1, grad_accum=2, lr=1e-3, patience=2),  # step 2 (the CIE)
    "eval": {"batch_size": 8, "cf": True, "step1": True, "icl": False, "zero_cf": False},
}


def validate(config: dict) -> None:
    check_model(config["model"], training=True)
    check_collm_protocol(config["data_protocol"])
    cf = config["cf"]
    if cf["valid"] not in ("all", "warm"):
        raise InputError(f"cf.valid: expected 'all' or 'warm', got {cf['valid']!r}")
    check_metric_name(cf["train"]["valid_metric"], "cf.train.valid_metric")
    if cf["model"] not in CF_MODELS:
        raise InputError(f"cf.model: expected one of {', '.join(CF_MODELS)}, got {cf['model']!r}")
    check_train_settings(cf["train"], "cf.train")
    check_model_settings(cf["params"], "cf.params")
    for key in ("tokens", "hidden_mult"):
        value = config["cie"][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"cie.{key}: expected an integer >= 1, got {value!r}")
    prompt = config["prompt"]
    if prompt["user_slot"] == prompt["item_slot"] or not prompt["user_slot"] or not prompt["item_slot"]:
        raise InputError("prompt.user_slot and prompt.item_slot must be two different non-empty strings")
    for key in ("text", "ids"):
        check_template({**prompt[key], "wrapper": prompt["wrapper"]}, f"prompt.{key}", SAMPLE_FIELDS)
    check_yes_no(prompt["yes"], prompt["no"])
    check_lora(config["lora"])
    check_train(config["step1"], "step1", min_epochs=0)
    check_train(config["step2"], "step2")


def train_cf(ctx: RunContext, section: dict, data, ds):
    """Pre-train the CF model on every training sample (CTR mode: BCE on like/dislike where supported)."""
    from recalign.cf import model_class, train_cf_model

    name = section["model"]
    params = dict(section["params"])
    if model_class(name).kind == "sequential" and "max_len" not in params:
        params["max_len"] = data.history_len  # histories never exceed L: no padding to the model's default
    train = dict(section["train"])
    if not train.get("objective"):
        train["objective"] = "bce" if "bce" in model_class(name).objectives else ""
    valid = data.valid_full[data.valid_full["warm"]] if section["valid"] == "warm" else data.valid_full
    return train_cf_model(name, data.train_all, {"model": params, "train": train}, catalog=ds,
                          valid=valid, run=ctx.run, checkpoint=f"cf-{name}", seed=ctx.seed,
                          log=ctx.log)


def cf_vectors(cf, frame, zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """User-side and item-side CF vectors [B, d] of the samples (differentiable when the CF model is)."""
    from recalign.cf import make_query

    query = make_query(frame["user"].to_numpy(), list(frame["history"]), cf.n_items, cf.max_len)
    users = cf.query_embedding(query)
    items = cf.item_embeddings()[torch.as_tensor(frame["item"].to_numpy(np.int64, copy=True))]
    if users.shape[1] != items.shape[1]:
        raise InputError(f"cf.model {cf.name}: user vectors ({users.shape[1]}) and item vectors "
                         f"({items.shape[1]}) differ in size")
    if zero:
        users, items = torch.zeros_like(users), torch.zeros_like(items)
    return users.float(), items.float()


class CoLLMSlots(nn.Module):
    """CIE (+ the CF model when it is tuned): sample rows -> {user_slot: [B,k,h], item_slot: [B,k,h]}."""

    def __init__(self, cf, cie: CIE, user_slot: str, item_slot: str, tune_cf: bool):
        super().__init__()
        self.cie = cie
        self.cf = cf if tune_cf else None
        self._frozen_cf = () if tune_cf else (cf,)  # a tuple: not a submodule, not trained, not checkpointed
        self.user_slot, self.item_slot = user_slot, item_slot
        if not tune_cf:
            for parameter in cf.parameters():
                parameter.requires_grad_(False)

    @property
    def cf_model(self):
        return self.cf if self.cf is not None else self._frozen_cf[0]

    def forward(self, frame, zero_cf: bool = False) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cf is not None):
            users, items = cf_vectors(self.cf_model, frame, zero=zero_cf)
        return {self.user_slot: self.cie(users), self.item_slot: self.cie(items)}


def run(ctx: RunContext) -> dict:
    cfg, ds, seed = ctx.config, ctx.dataset, ctx.seed
    check_titles_free_of(ds, {cfg["prompt"][key]: f"prompt.{key}" for key in ("user_slot", "item_slot")})
    data = collm_protocol(ds, cfg["data_protocol"], seed)
    ctx.log(f"CTR protocol: {data.summary()}")
    seconds = {"cf": 0.0, "step1": 0.0, "step2": 0.0}

    started = time.perf_counter()
    cf = train_cf(ctx, cfg["cf"], data, ds)
    cf.eval()
    seconds["cf"] = time.perf_counter() - started

    backbone = ctx.backbone()
    pcfg = cfg["prompt"]
    slots = (pcfg["user_slot"], pcfg["item_slot"])
    frames = {"train": data.train, "valid": data.valid, "test": data.test}
    text = prompts_of(backbone, pcfg, "text", frames, ds, ctx.noun, forbid=slots)
    ids = prompts_of(backbone, pcfg, "ids", frames, ds, ctx.noun, require=slots)
    scorer = Scorer(ctx.run, backbone, pcfg["yes"], pcfg["no"], cfg["eval"]["batch_size"])

    test_scores: dict[str, np.ndarray] = {}  # row -> per-sample test scores, for the paired differences

    def evaluate(name: str, frame, compute) -> dict:
        scores = scorer.cached(name, len(frame), compute)
        if frame is data.test:
            test_scores[name.removesuffix("-test")] = scores
        metrics = ctr_report(frame, scores)
        ctx.log(f"{name}: {summary_line(metrics)}")
        return metrics

    baselines: dict = {}
    if cfg["eval"]["cf"]:
        from recalign.cf import EvalSet, score_pairs

        baselines["cf"] = {}
        for split, frame in (("valid", data.valid), ("test", data.test), ("test_full", data.test_full)):
            scores = score_pairs(cf, EvalSet.from_samples(frame))
            baselines["cf"][split] = ctr_report(frame, scores)
            if split == "test":
                test_scores["cf"] = scores
        ctx.log(f"cf {cf.name} alone: test auc {baselines['cf']['test']['auc']:.4f}")
    floor = counting_baselines(data.train_all, data.test)  # the floor: counts, no model
    baselines.update(counting_rows(floor, data.test))
    test_scores.update(floor)
    if cfg["eval"]["icl"]:
        baselines["icl"] = {"test": evaluate("icl-test", data.test,
                                             lambda: scorer.scores(text["test"], progress="ICL test"))}

    # ---- step 1: LoRA on the text prompt (TALLRec); LoRA frozen afterwards
    training = {"cf": getattr(cf, "train_summary", {})}
    step1 = cfg["step1"]
    if step1["epochs"] > 0 or step1["init_from"]:
        examples = [(p, pcfg["yes"] if y else pcfg["no"]) for p, y in zip(text["train"], data.train["label"])]
        training["step1"] = lora_step(
            ctx.run, backbone, examples, cfg["lora"], step1, seed, "step1", ctx.run.path / "step1_adapter",
            evaluate=lambda: valid_auc(data.valid, scorer.scores(text["valid"])), log=ctx.log,
            init_from=step1_adapter(step1["init_from"]), yes=pcfg["yes"], no=pcfg["no"])
        seconds["step1"] = training["step1"]["seconds"]
        if cfg["eval"]["step1"]:
            baselines["step1"] = {"test": evaluate("step1-test", data.test,
                                                   lambda: scorer.scores(text["test"], progress="step-1 test"))}

    # ---- step 2: CIE only (LoRA frozen; CF frozen unless cf.tune)
    torch.manual_seed(seed)
    cie = CIE(cf.item_embeddings().shape[1], backbone.hidden_size, cfg["cie"]["tokens"], cfg["cie"]["hidden_mult"])
    slot_module = CoLLMSlots(cf, cie, *slots, tune_cf=cfg["cf"]["tune"])
    labels = torch.tensor(data.train["label"].to_numpy(bool), dtype=torch.float32)

    def loss_fn(batch: list[int]):
        rows = data.train.iloc[batch]
        return backbone.yes_no_bce([ids["train"][i] for i in batch], labels[batch], slots=slot_module(rows),
                                   yes=pcfg["yes"], no=pcfg["no"])

    def score_ids(split: str, zero_cf: bool = False, progress: str | None = None) -> np.ndarray:
        with torch.no_grad():
            fills = slot_module(frames[split], zero_cf=zero_cf)
        return scorer.scores(ids[split], slots=fills, progress=progress)

    training["step2"] = train_slot_modules(
        ctx.run, backbone, slot_module, TrainConfig.from_config(cfg["step2"], seed, "step2"), len(data.train),
        loss_fn, lambda: valid_auc(data.valid, score_ids("valid")), "step2", log=ctx.log)
    seconds["step2"] = training["step2"]["seconds"]
    ctx.run.save_checkpoint("collm-slots", {k: v.detach().clone() for k, v in slot_module.state_dict().items()})

    slot_module.eval()
    eval_started = scorer.seconds
    test = evaluate("test", data.test, lambda: score_ids("test", progress="CoLLM test"))
    valid = evaluate("valid", data.valid, lambda: score_ids("valid"))
    ablation = {}
    if cfg["eval"]["zero_cf"]:
        ablation["zero_cf"] = {"test": evaluate("zero-cf-test", data.test,
                                                lambda: score_ids("test", zero_cf=True, progress="zero-CF test"))}
    ctx.run.write_json("predictions-test.json", {
        "user": data.test["user"].tolist(), "item": data.test["item"].tolist(),
        "label": data.test["label"].astype(int).tolist(),
        "warm": data.test["warm"].astype(int).tolist() if "warm" in data.test else None,
        "scores": {("collm" if row == "test" else row): np.asarray(v, dtype=np.float64).tolist()
                   for row, v in test_scores.items()}})
    paired = {f"collm-{row}": paired_ctr_report(data.test, test_scores["test"], test_scores[row])
              for row in ("cf", "item_like_rate", "step1", "icl", "zero-cf") if row in test_scores}
    for name, difference in paired.items():
        ctx.log(f"{name}: " + ", ".join(f"{k} {v['difference']:+.4f} {signed_span(v['ci'])}" for k, v in difference.items()
                                        if k.startswith("auc")))
    return {
        "test": test, "valid": valid, "paired": paired,
        "seconds": {"train": seconds["cf"] + seconds["step1"] + seconds["step2"],
                    "eval": scorer.seconds - eval_started, **seconds, "eval_all": scorer.seconds},
        "baselines": baselines, "ablation": ablation, "data": data.summary(), "training": training,
    }


def prompts_of(backbone: Backbone, pcfg: dict, key: str, frames: dict, ds, noun: str,
               **slot_rules) -> dict[str, list[str]]:
    """CoLLM's prompt `key` (text | ids) for each frame; {liked} = the last L liked titles or `empty_history`."""
    prompter = Prompter(pcfg[key], backbone.tokenizer, pcfg["wrapper"], pcfg["system"], where=f"prompt.{key}",
                        **slot_rules)
    return {name: prompter.render_all(frame_fields(frame, ds.titles(), noun, quote_target=False,
                                                   empty_history=pcfg["empty_history"]))
            for name, frame in frames.items()}


def step1_adapter(init_from: str | None) -> str | None:
    """`step1.init_from`: a peft adapter directory, or a CoLLM run directory holding step1_adapter/."""
    if not init_from:
        return None
    from pathlib import Path

    path = Path(init_from)
    if (path / "step1_adapter").is_dir():
        path = path / "step1_adapter"
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"step1.init_from: {init_from} is neither a peft adapter directory nor a run "
                         "directory with step1_adapter/")
    return str(path)


def report(metrics: dict) -> str:
    """Markdown: CoLLM next to its baselines on the same test cases (all / warm / cold)."""
    from recalign.report.markdown import metrics_table

    columns = ["auc", "uauc", "auc_warm", "uauc_warm", "auc_cold", "uauc_cold", "n_warm", "n_cold"]
    rows = []
    names = {"cf": "CF model alone (CTR)", "item_like_rate": "item like-rate (counting, no model)",
             "icl": "ICL (base LLM, zero-shot)", "step1": "step 1 only (TALLRec)"}
    for key, label in names.items():
        if key in metrics.get("baselines", {}):
            rows.append((label, metrics["baselines"][key]["test"]))
    rows.append(("CoLLM", metrics["test"]))
    if "zero_cf" in metrics.get("ablation", {}):
        rows.append(("CoLLM, CF embeddings zeroed", metrics["ablation"]["zero_cf"]["test"]))
    text = "## Test cases: CoLLM and baselines\n\n" + metrics_table(rows, columns)
    paired = metrics.get("paired", {})
    if paired:
        labels = {**names, "zero-cf": "CoLLM, CF embeddings zeroed"}
        slices = ["auc", "auc_warm", "auc_cold", "uauc", "uauc_warm", "uauc_cold"]
        lines = ["", "## CoLLM minus each row, paired on the same test samples (difference [95% interval])", "",
                 "| CoLLM − | " + " | ".join(slices) + " |", "|---|" + "---|" * len(slices)]
        for name, difference in paired.items():
            cells = [f"{difference[k]['difference']:+.4f} {signed_span(difference[k]['ci'])}" if k in difference else "–"
                     for k in slices]
            lines.append(f"| {labels.get(name.removeprefix('collm-'), name)} | " + " | ".join(cells) + " |")
        text += "\n".join(lines) + "\n"
    return text


SMOKE = {"model.name": "tiny-random", "data_protocol.max_train": 8, "data_protocol.max_valid": 8,
         "data_protocol.max_test_warm": 6, "data_protocol.max_test_cold": 6, "data_protocol.max_per_user": 4,
         "cf.train.epochs": 1, "step1.grad_accum": 1, "step2.grad_accum": 1}
METHODS = [Method("collm", "CoLLM: CF embeddings mapped by the CIE into <UserID>/<TargetItemID> tokens; "
                           "step 1 LoRA on text, step 2 CIE only; AUC/UAUC on all/warm/cold.",
                  DEFAULTS, run, report=report, validate=validate,
                  needs=lambda c: Needs.ctr(min_history=c["data_protocol"]["min_history"], liked_history=True),
                  nullable={**MODEL_NULLABLE, **COLLM_NULLABLE, "step1.init_from": ""}, smoke=SMOKE)]

_TABLE = "CoLLM: AUC / UAUC on all, warm and cold test cases (ML-100K, CoLLM's CTR protocol)"
_QUICK = {"data_protocol.max_train": 32, "data_protocol.max_valid": 16, "data_protocol.max_test_warm": 24,
          "data_protocol.max_test_cold": 24, "data_protocol.max_per_user": 6, "cf.train.epochs": 30}
# full: 2,000 test cases (1,000 of the 1,350 warm ones + 1,000 cold, at most 100 per user: 83 users); step 1
# trained as long as TALLRec's own 256-shot recipe (3 epochs = 192 steps of 4, validation every 32 steps)
_FULL = {"data_protocol.max_train": 256, "data_protocol.max_valid": 64, "data_protocol.max_test_warm": 1000,
         "data_protocol.max_test_cold": 1000, "data_protocol.max_per_user": 100, "step1.epochs": 3,
         "step1.grad_accum": 1, "step1.eval_every": 32, "step1.patience": 3}
EXPERIMENTS = [
    Experiment("collm-mf", "collm", table=_TABLE, quick=_QUICK, full={**_FULL, "eval.icl": True, "eval.zero_cf": True}),
    *[Experiment(f"collm-{cf}", "collm", table=_TABLE, full={**_FULL, "cf.model": cf}, profiles=("full",))
      for cf in ("lightgcn", "sasrec")],
]
