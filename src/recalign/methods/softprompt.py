"""Soft-Prompt: prompt tuning for Yes/No recommendation (Lester et al., 2021), the CoLLM paper's baseline that
adapts the LLM with learned prompt vectors and no collaborative information.

k free vectors (initialised from the embeddings of a text) fill the <SoftPrompt> placeholder of CoLLM's text
prompt; the LLM stays frozen (`softprompt.lora: true` tunes LoRA jointly). Loss = binary cross-entropy on
logit("Yes") − logit("No"). Same CTR protocol, test cases and metrics as `collm` (all / warm / cold), with the
item like-rate counting baseline on the same cases (`baselines`) and paired against it (`paired`).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from recalign.errors import InputError
from recalign.llm import (LORA_CONFIG, MODEL_CONFIG, MODEL_NULLABLE, LoraSettings, Prompter, Scorer,
                          SoftPrompt, TrainConfig, check_lora, check_model, check_train, check_yes_no,
                          soft_prompt_init, train_section, train_slot_modules)
from recalign.llm.prompts import check_template
from recalign.data import Needs
from recalign.methods.api import Experiment, Method, RunContext
from recalign.tasks.ctr import (COLLM_NULLABLE, COLLM_PROTOCOL, check_collm_protocol, collm_protocol, counting_baselines,
                                counting_rows, ctr_report, paired_with_counting, summary_line, valid_auc)
from recalign.tasks.text import SAMPLE_FIELDS, check_titles_free_of, frame_fields

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "data_protocol": copy.deepcopy(COLLM_PROTOCOL),
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
    "lora": copy.deepcopy(LORA_CONFIG),
    "train": train_section(epochs=1, grad_accum=2, lr=3e-3, patience=2),
    "eval": {"batch_size": 8},
}


def validate(config: dict) -> None:
    check_model(config["model"], training=True)
    check_collm_protocol(config["data_protocol"])
    tokens = config["softprompt"]["tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InputError(f"softprompt.tokens: expected an integer >= 1, got {tokens!r}")
    prompt = config["prompt"]
    if not prompt["slot"]:
        raise InputError("prompt.slot: the soft-prompt placeholder must be a non-empty string")
    check_template({**prompt["template"], "wrapper": prompt["wrapper"]}, "prompt.template", SAMPLE_FIELDS,
                   uses_one_of=("target",))
    check_yes_no(prompt["yes"], prompt["no"])
    check_lora(config["lora"])
    check_train(config["train"])


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
    data = collm_protocol(ds, cfg["data_protocol"], seed)
    ctx.log(f"CTR protocol: {data.summary()}")
    backbone = ctx.backbone()
    pcfg, scfg = cfg["prompt"], cfg["softprompt"]
    check_titles_free_of(ds, {pcfg["slot"]: "prompt.slot"})
    prompter = Prompter(pcfg["template"], backbone.tokenizer, pcfg["wrapper"], pcfg["system"],
                        where="prompt.template", require=(pcfg["slot"],))
    scorer = Scorer(ctx.run, backbone, pcfg["yes"], pcfg["no"], cfg["eval"]["batch_size"])
    frames = {"train": data.train, "valid": data.valid, "test": data.test}
    prompts = {k: prompter.render_all(frame_fields(f, ds.titles(), ds.domain, quote_target=False,
                                                   empty_history=pcfg["empty_history"]))
               for k, f in frames.items()}

    torch.manual_seed(seed)
    if scfg["lora"]:
        backbone.add_lora(LoraSettings.from_config(cfg["lora"]))
    init_ids = backbone.tokenize_piece(scfg["init_text"]) if scfg["init_text"] else []
    prompt = SoftPrompt(soft_prompt_init(backbone.input_embeddings(), init_ids, scfg["tokens"], seed))
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    tuned = TunedPrompt(prompt, backbone.model if scfg["lora"] else None)
    labels = torch.tensor(data.train["label"].to_numpy(bool), dtype=torch.float32)

    def fills(n: int) -> dict[str, torch.Tensor]:
        return {pcfg["slot"]: prompt(n)}

    def loss_fn(batch: list[int]):
        return backbone.yes_no_bce([prompts["train"][i] for i in batch], labels[batch], slots=fills(len(batch)),
                                   yes=pcfg["yes"], no=pcfg["no"])

    def score(split: str, progress: str | None = None) -> np.ndarray:
        with torch.no_grad():
            values = fills(len(prompts[split]))
        return scorer.scores(prompts[split], slots={k: v.detach() for k, v in values.items()}, progress=progress)

    def evaluate(name: str, frame, compute) -> tuple[dict, np.ndarray]:
        scores = scorer.cached(name, len(frame), compute)
        metrics = ctr_report(frame, scores)
        ctx.log(f"{name}: {summary_line(metrics)}")
        return metrics, scores

    started = time.perf_counter()
    training = train_slot_modules(ctx.run, backbone, tuned, TrainConfig.from_config(cfg["train"], seed),
                                  len(data.train), loss_fn, lambda: valid_auc(data.valid, score("valid")),
                                  "softprompt", log=ctx.log)
    train_seconds = time.perf_counter() - started
    tuned.eval()
    eval_started = scorer.seconds
    test, test_scores = evaluate("test", data.test, lambda: score("test", progress="soft-prompt test"))
    valid, _ = evaluate("valid", data.valid, lambda: score("valid"))
    ctx.write_predictions("predictions-test.json", data.test, test_scores)
    floor = counting_baselines(data.train_all, data.test)  # the floor: counts, no model
    return {"test": test, "valid": valid,
            "seconds": {"train": train_seconds, "eval": scorer.seconds - eval_started},
            "baselines": counting_rows(floor, data.test),
            "paired": paired_with_counting("softprompt", data.test, test_scores, floor),
            "data": data.summary(), "training": training}


METHODS = [Method("softprompt", "Soft-Prompt: learned prompt vectors (prompt tuning), no CF; "
                                "CoLLM's CTR protocol, AUC/UAUC on all/warm/cold.",
                  DEFAULTS, run, validate=validate, nullable={**MODEL_NULLABLE, **COLLM_NULLABLE},
                  needs=lambda c: Needs.ctr(min_history=c["data_protocol"]["min_history"], liked_history=True),
                  smoke={"model.name": "tiny-random", "data_protocol.max_train": 8, "data_protocol.max_valid": 8,
                         "data_protocol.max_test_warm": 6, "data_protocol.max_test_cold": 6,
                         "data_protocol.max_per_user": 4, "train.grad_accum": 1, "softprompt.tokens": 2})]

_QUICK = {"data_protocol.max_train": 32, "data_protocol.max_valid": 16, "data_protocol.max_test_warm": 24,
          "data_protocol.max_test_cold": 24, "data_protocol.max_per_user": 6}
# full: the CoLLM rows' samples (256 training samples; 2,000 test cases: 1,000 of the 1,350 warm ones + 1,000 cold,
# at most 100 per user: 83 users)
_FULL = {"data_protocol.max_train": 256, "data_protocol.max_valid": 64, "data_protocol.max_test_warm": 1000,
         "data_protocol.max_test_cold": 1000, "data_protocol.max_per_user": 100}
EXPERIMENTS = [Experiment("softprompt", "softprompt",
                          table="CoLLM: AUC / UAUC on all, warm and cold test cases (ML-100K, CoLLM's CTR protocol)",
                          quick=_QUICK, full=_FULL)]
