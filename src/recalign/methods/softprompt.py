"""Soft-Prompt: prompt tuning for Yes/No recommendation (Lester et al., 2021), the CoLLM paper's baseline that
adapts the LLM with learned prompt vectors and no collaborative information.

k free vectors (initialised from the embeddings of a text) fill the <SoftPrompt> placeholder of CoLLM's text
prompt; the LLM stays frozen (`softprompt.lora: true` tunes LoRA jointly). Loss = binary cross-entropy on
logit("Yes") − logit("No"). Same CTR protocol, test cases and metrics as `collm` (all / warm / cold).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from recalign.errors import InputError
from recalign.hybrid.modules import SoftPrompt, soft_prompt_init
from recalign.hybrid.protocol import PROTOCOL_DEFAULTS, build_ctr_data, check_protocol
from recalign.hybrid.recipe import (LORA_DEFAULTS, MODEL_DEFAULTS, Evaluator, Prompter, labels_of, load_backbone,
                                    train_config, train_slot_modules, valid_auc_fn)
from recalign.llm import LoraSettings
from recalign.methods import Experiment, Method, RunContext

DEFAULTS = {
    "model": dict(MODEL_DEFAULTS),
    "data_protocol": dict(PROTOCOL_DEFAULTS),
    "prompt": {
        "wrapper": "auto",
        "system": "",
        "template": {  # CoLLM's text prompt with the placeholder in front
            "instruction": '<SoftPrompt> Answer with "Yes" or "No".',
            "input": 'A user liked these {nouns}: {liked}. Will the user enjoy the {noun} titled "{target}"?',
        },
        "slot": "<SoftPrompt>",
        "empty_history": "none",
        "yes": "Yes",
        "no": "No",
    },
    "softprompt": {
        "tokens": 10,  # learned prompt vectors
        "init_text": "Predict whether the user will like the item, based on the items the user liked.",  # "" = random tokens
        "lora": False,  # also tune LoRA (jointly); default: the LLM stays frozen
    },
    "lora": dict(LORA_DEFAULTS),
    "train": {"epochs": 1, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant",
              "eval_every": 0, "patience": 2, "max_steps": 0},
    "eval": {"batch_size": 8},
}


def validate(config: dict) -> None:
    check_protocol(config["data_protocol"])
    tokens = config["softprompt"]["tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InputError(f"softprompt.tokens: expected an integer >= 1, got {tokens!r}")
    if not config["prompt"]["slot"]:
        raise InputError("prompt.slot: the soft-prompt placeholder must be a non-empty string")


class TunedPrompt(nn.Module):
    """The soft prompt (+ the LoRA weights when they are tuned too): what is trained and checkpointed."""

    def __init__(self, prompt: SoftPrompt, lora_model: nn.Module | None):
        super().__init__()
        self.prompt = prompt
        self.lora = nn.ParameterDict()
        if lora_model is not None:
            for name, parameter in lora_model.named_parameters():
                if "lora_" in name:
                    parameter.requires_grad_(True)
                    self.lora[name.replace(".", "__")] = parameter


def run(ctx: RunContext) -> dict:
    cfg, ds, seed = ctx.config, ctx.dataset, ctx.seed
    validate(cfg)
    data = build_ctr_data(ds, cfg["data_protocol"], seed)
    ctx.log(f"CTR protocol: {data.summary()}")
    backbone = load_backbone(cfg["model"])
    pcfg, scfg = cfg["prompt"], cfg["softprompt"]
    prompter = Prompter(backbone, pcfg["template"], ds.titles(), ds.domain, wrapper=pcfg["wrapper"],
                        system=pcfg["system"], empty_history=pcfg["empty_history"], where="prompt.template",
                        require=(pcfg["slot"],))
    evaluator = Evaluator(ctx.run, backbone, pcfg["yes"], pcfg["no"], cfg["eval"]["batch_size"], ctx.log)
    frames = {"train": data.train, "valid": data.valid, "test": data.test}
    prompts = {k: prompter(f) for k, f in frames.items()}

    torch.manual_seed(seed)
    if scfg["lora"]:
        backbone.add_lora(LoraSettings.from_config(cfg["lora"]))
    init_ids = backbone.tokenize_piece(scfg["init_text"]) if scfg["init_text"] else []
    prompt = SoftPrompt(soft_prompt_init(backbone.input_embeddings(), init_ids, scfg["tokens"], seed))
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    tuned = TunedPrompt(prompt, backbone.model if scfg["lora"] else None)
    labels = labels_of(data.train)

    def fills(n: int) -> dict[str, torch.Tensor]:
        return {pcfg["slot"]: prompt(n)}

    def loss_fn(batch: list[int]):
        return backbone.yes_no_bce([prompts["train"][i] for i in batch], labels[batch], slots=fills(len(batch)),
                                   yes=pcfg["yes"], no=pcfg["no"])

    def score(split: str, progress: str | None = None) -> np.ndarray:
        with torch.no_grad():
            values = fills(len(prompts[split]))
        return evaluator.scores(prompts[split], slots={k: v.detach() for k, v in values.items()}, progress=progress)

    started = time.perf_counter()
    training = train_slot_modules(ctx, backbone, tuned, train_config(cfg["train"], seed, "train"), len(data.train),
                                  loss_fn, valid_auc_fn(data.valid, lambda: score("valid")), "softprompt")
    train_seconds = time.perf_counter() - started
    tuned.eval()
    eval_started = evaluator.seconds
    test = evaluator.cached("test", data.test, lambda: score("test", progress="soft-prompt test"))
    valid = evaluator.cached("valid", data.valid, lambda: score("valid"))
    return {"test": test, "valid": valid,
            "seconds": {"train": train_seconds, "eval": evaluator.seconds - eval_started},
            "data": data.summary(), "training": training}


METHODS = {"softprompt": Method("softprompt", "Soft-Prompt: learned prompt vectors (prompt tuning), no CF; "
                                              "CoLLM's CTR protocol, AUC/UAUC on all/warm/cold.",
                                DEFAULTS, run, validate=validate)}

_QUICK = {"data_protocol.max_train": 32, "data_protocol.max_valid": 16, "data_protocol.max_test_warm": 24,
          "data_protocol.max_test_cold": 24, "data_protocol.max_per_user": 6}
_FULL = {"data_protocol.max_train": 300, "data_protocol.max_valid": 64, "data_protocol.max_test_warm": 200,
         "data_protocol.max_test_cold": 200, "data_protocol.max_per_user": 20}
EXPERIMENTS = [Experiment("softprompt", "softprompt",
                          table="CoLLM: AUC / UAUC on all, warm and cold test cases (ML-100K, CoLLM's CTR protocol)",
                          quick=_QUICK, full=_FULL)]
