"""CoLLM: collaborative embeddings as tokens (Zhang et al., 2023).

A pre-trained CF model (MF, LightGCN or SASRec; frozen by default) gives a user vector (MF/LightGCN: the
user's embedding; SASRec: the encoding of the user's liked-item history) and an item vector; the CIE
(Linear(d, 10d) → ReLU → Linear(10d, hidden·k)) maps each to k token embeddings that replace the input
embeddings at the <UserID> / <TargetItemID> placeholders. Score = logit("Yes") − logit("No") at the
answer position, loss = binary cross-entropy.

Two steps: (1) LoRA only, on the text prompt without IDs (= TALLRec on CoLLM's prompt); (2) CIE only, LoRA
frozen, on the ID prompt. Data: CoLLM's CTR protocol (`recalign.hybrid.protocol`): every interaction a
sample, history = last 10 liked items, split on the time axis, AUC / UAUC on all, warm and cold cases.

Besides CoLLM's own metrics the run reports, on the same test cases: the CF model alone in CTR mode
(`baselines.cf`), the step-1 model (`baselines.step1`, TALLRec), optionally the base LLM zero-shot
(`baselines.icl`) and CoLLM with zeroed CF embeddings (`ablation.zero_cf`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from recalign.errors import InputError
from recalign.hybrid.modules import CIE
from recalign.hybrid.protocol import PROTOCOL_DEFAULTS, build_ctr_data, check_protocol, warm_cold_metrics
from recalign.hybrid.recipe import (LORA_DEFAULTS, MODEL_DEFAULTS, Evaluator, Prompter, labels_of, load_backbone,
                                    text_lora_step, train_config, train_slot_modules, valid_auc_fn)
from recalign.methods import Experiment, Method, RunContext

CF_MODELS = ("mf", "lightgcn", "sasrec")
INSTRUCTION = 'Answer with "Yes" or "No".'


DEFAULTS = {
    "model": dict(MODEL_DEFAULTS),
    "data_protocol": dict(PROTOCOL_DEFAULTS),
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
    "lora": dict(LORA_DEFAULTS),
    "step1": {"init_from": None, "loss": "bce", "epochs": 1, "batch_size": 4, "grad_accum": 2, "lr": 1e-3,
              "warmup_steps": 0, "schedule": "constant", "eval_every": 0, "patience": 2, "max_steps": 0},
    "step2": {"epochs": 1, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 0,
              "schedule": "constant", "eval_every": 0, "patience": 2, "max_steps": 0},
    "eval": {"batch_size": 8, "cf": True, "step1": True, "icl": False, "zero_cf": False},
}


def validate(config: dict) -> None:
    check_protocol(config["data_protocol"])
    cf = config["cf"]
    if cf["valid"] not in ("all", "warm"):
        raise InputError(f"cf.valid: expected 'all' or 'warm', got {cf['valid']!r}")
    if cf["model"] not in CF_MODELS:
        raise InputError(f"cf.model: expected one of {', '.join(CF_MODELS)}, got {cf['model']!r}")
    for key in ("tokens", "hidden_mult"):
        value = config["cie"][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"cie.{key}: expected an integer >= 1, got {value!r}")
    prompt = config["prompt"]
    if prompt["user_slot"] == prompt["item_slot"] or not prompt["user_slot"] or not prompt["item_slot"]:
        raise InputError("prompt.user_slot and prompt.item_slot must be two different non-empty strings")
    for step in ("step1", "step2"):
        if not isinstance(config[step]["epochs"], int) or config[step]["epochs"] < (0 if step == "step1" else 1):
            raise InputError(f"{step}.epochs: expected an integer >= {0 if step == 'step1' else 1}")
    if config["step1"]["loss"] not in ("bce", "lm"):
        raise InputError(f"step1.loss: expected 'bce' or 'lm', got {config['step1']['loss']!r}")


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
    validate(cfg)
    data = build_ctr_data(ds, cfg["data_protocol"], seed)
    ctx.log(f"CTR protocol: {data.summary()}")
    seconds = {"cf": 0.0, "step1": 0.0, "step2": 0.0}

    started = time.perf_counter()
    cf = train_cf(ctx, cfg["cf"], data, ds)
    cf.eval()
    seconds["cf"] = time.perf_counter() - started

    backbone = load_backbone(cfg["model"])
    pcfg = cfg["prompt"]
    slots = (pcfg["user_slot"], pcfg["item_slot"])
    common = dict(wrapper=pcfg["wrapper"], system=pcfg["system"], empty_history=pcfg["empty_history"])
    text_prompter = Prompter(backbone, pcfg["text"], ds.titles(), ds.domain, where="prompt.text", forbid=slots,
                             **common)
    ids_prompter = Prompter(backbone, pcfg["ids"], ds.titles(), ds.domain, where="prompt.ids", require=slots,
                            **common)
    evaluator = Evaluator(ctx.run, backbone, pcfg["yes"], pcfg["no"], cfg["eval"]["batch_size"], ctx.log)
    frames = {"train": data.train, "valid": data.valid, "test": data.test}
    text = {k: text_prompter(f) for k, f in frames.items()}
    ids = {k: ids_prompter(f) for k, f in frames.items()}
    baselines: dict = {}

    if cfg["eval"]["cf"]:
        from recalign.cf import EvalSet, score_pairs

        baselines["cf"] = {split: warm_cold_metrics(frames[split], score_pairs(cf, EvalSet.from_samples(frames[split])))
                           for split in ("valid", "test")}
        baselines["cf"]["test_full"] = warm_cold_metrics(data.test_full,
                                                         score_pairs(cf, EvalSet.from_samples(data.test_full)))
        ctx.log(f"cf {cf.name} alone: test auc {baselines['cf']['test']['auc']:.4f}")
    if cfg["eval"]["icl"]:
        baselines["icl"] = {"test": evaluator.cached("icl-test", data.test,
                                                     lambda: evaluator.scores(text["test"], progress="ICL test"))}

    # ---- step 1: LoRA on the text prompt (TALLRec); LoRA frozen afterwards
    training = {"cf": getattr(cf, "train_summary", {})}
    if cfg["step1"]["epochs"] > 0 or cfg["step1"]["init_from"]:
        training["step1"] = text_lora_step(ctx, backbone, cfg["step1"], cfg["lora"], text["train"],
                                           labels_of(data.train), text["valid"], data.valid, evaluator)
        seconds["step1"] = training["step1"]["seconds"]
        if cfg["eval"]["step1"]:
            baselines["step1"] = {"test": evaluator.cached("step1-test", data.test,
                                                           lambda: evaluator.scores(text["test"], progress="step-1 test"))}

    # ---- step 2: CIE only (LoRA frozen; CF frozen unless cf.tune)
    torch.manual_seed(seed)
    cf_dim = cf.item_embeddings().shape[1]
    cie = CIE(cf_dim, backbone.hidden_size, cfg["cie"]["tokens"], cfg["cie"]["hidden_mult"])
    slot_module = CoLLMSlots(cf, cie, *slots, tune_cf=cfg["cf"]["tune"])
    labels = labels_of(data.train)

    def loss_fn(batch: list[int]):
        rows = data.train.iloc[batch]
        return backbone.yes_no_bce([ids["train"][i] for i in batch], labels[batch], slots=slot_module(rows),
                                   yes=pcfg["yes"], no=pcfg["no"])

    def score_ids(split: str, zero_cf: bool = False, progress: str | None = None) -> np.ndarray:
        with torch.no_grad():
            fills = slot_module(frames[split], zero_cf=zero_cf)
        return evaluator.scores(ids[split], slots=fills, progress=progress)

    training["step2"] = train_slot_modules(ctx, backbone, slot_module, train_config(cfg["step2"], seed, "step2"),
                                           len(data.train), loss_fn, valid_auc_fn(data.valid, lambda: score_ids("valid")),
                                           "step2")
    seconds["step2"] = training["step2"]["seconds"]
    ctx.run.save_checkpoint("collm-slots", {k: v.detach().clone() for k, v in slot_module.state_dict().items()})

    slot_module.eval()
    eval_started = evaluator.seconds
    test = evaluator.cached("test", data.test, lambda: score_ids("test", progress="CoLLM test"))
    valid = evaluator.cached("valid", data.valid, lambda: score_ids("valid"))
    ablation = {}
    if cfg["eval"]["zero_cf"]:
        ablation["zero_cf"] = {"test": evaluator.cached("zero-cf-test", data.test,
                                                        lambda: score_ids("test", zero_cf=True, progress="zero-CF test"))}
    return {
        "test": test, "valid": valid,
        "seconds": {"train": seconds["cf"] + seconds["step1"] + seconds["step2"],
                    "eval": evaluator.seconds - eval_started, **seconds, "eval_all": evaluator.seconds},
        "baselines": baselines, "ablation": ablation, "data": data.summary(), "training": training,
    }


def report(metrics: dict) -> str:
    """Markdown: CoLLM next to its baselines on the same test cases (all / warm / cold)."""
    from recalign.report.markdown import metrics_table

    columns = ["auc", "uauc", "auc_warm", "uauc_warm", "auc_cold", "uauc_cold", "n_warm", "n_cold"]
    rows = []
    names = {"cf": "CF model alone (CTR)", "icl": "ICL (base LLM, zero-shot)", "step1": "step 1 only (TALLRec)"}
    for key, label in names.items():
        if key in metrics.get("baselines", {}):
            rows.append((label, metrics["baselines"][key]["test"]))
    rows.append(("CoLLM", metrics["test"]))
    if "zero_cf" in metrics.get("ablation", {}):
        rows.append(("CoLLM, CF embeddings zeroed", metrics["ablation"]["zero_cf"]["test"]))
    return "## Test cases: CoLLM and baselines\n\n" + metrics_table(rows, columns)


METHODS = {"collm": Method("collm", "CoLLM: CF embeddings mapped by the CIE into <UserID>/<TargetItemID> tokens; "
                                    "step 1 LoRA on text, step 2 CIE only; AUC/UAUC on all/warm/cold.",
                           DEFAULTS, run, report=report, validate=validate)}

_TABLE = "CoLLM: AUC / UAUC on all, warm and cold test cases (ML-100K, CoLLM's CTR protocol)"
_QUICK = {"data_protocol.max_train": 32, "data_protocol.max_valid": 16, "data_protocol.max_test_warm": 24,
          "data_protocol.max_test_cold": 24, "data_protocol.max_per_user": 6, "cf.train.epochs": 30}
_FULL = {"data_protocol.max_train": 300, "data_protocol.max_valid": 64, "data_protocol.max_test_warm": 200,
         "data_protocol.max_test_cold": 200, "data_protocol.max_per_user": 20}
EXPERIMENTS = [
    Experiment("collm-mf", "collm", table=_TABLE, quick=_QUICK, full={**_FULL, "eval.icl": True, "eval.zero_cf": True}),
    *[Experiment(f"collm-{cf}", "collm", table=_TABLE, full={**_FULL, "cf.model": cf}, profiles=("full",))
      for cf in ("lightgcn", "sasrec")],
]
