"""ICL: zero-shot prompting of the base LLM with TALLRec's prompt, scored by logit(Yes) - logit(No).

No tuning. The seed's point: in-context learning alone is not enough (AUC near 0.5)."""

from __future__ import annotations

import copy
import time

from recalign.llm import MODEL_CONFIG, MODEL_NULLABLE, Backbone, Prompter, check_model, check_yes_no
from recalign.llm.prompts import check_template
from recalign.data import Needs
from recalign.methods.api import Experiment, Method, RunContext
from recalign.tasks.ctr import (TALLREC_PROMPT, TALLREC_SAMPLES, check_tallrec_samples, counting_baselines, counting_rows,
                                ctr_report, paired_with_counting, tallrec_protocol)
from recalign.tasks.text import SAMPLE_FIELDS, frame_fields

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "prompt": copy.deepcopy(TALLREC_PROMPT),
    "samples": copy.deepcopy(TALLREC_SAMPLES),
}


def validate(config: dict) -> None:
    check_model(config["model"])
    check_template(config["prompt"], "prompt", SAMPLE_FIELDS, uses_one_of=("target",))
    check_yes_no(config["prompt"]["yes"], config["prompt"]["no"])
    check_tallrec_samples(config["samples"])


def prompter_for(backbone: Backbone, prompt: dict) -> Prompter:
    return Prompter(prompt, backbone.tokenizer, prompt["wrapper"], prompt["system"], prompt["max_tokens"],
                    backbone.count_tokens)


def run(ctx: RunContext) -> dict:
    cfg, ds = ctx.config, ctx.dataset
    started = time.perf_counter()
    backbone = ctx.backbone()
    data = tallrec_protocol(ds, cfg["samples"])
    ctx.log(f"ICL with {cfg['model']['name']}: {len(data.valid)} valid / {len(data.test)} test samples "
            f"(of {len(data.valid_full)} / {len(data.test_full)})")
    prompter = prompter_for(backbone, cfg["prompt"])
    floor = counting_baselines(data.train, data.test)  # what counting alone gets on the same test samples
    out, paired = {}, {}
    for name, frame in (("valid", data.valid), ("test", data.test)):
        prompts = prompter.render_all(frame_fields(frame, ds.titles(), ctx.noun))
        scores = backbone.score_yes_no(prompts, cfg["prompt"]["yes"], cfg["prompt"]["no"], progress=f"ICL {name}")
        out[name] = ctr_report(frame, scores.numpy())
        if name == "test":
            ctx.write_predictions("predictions.json", frame, scores.numpy())
            paired = paired_with_counting("icl", frame, scores.numpy(), floor)
    ctx.log(f"ICL test AUC {out['test']['auc']:.4f} UAUC {out['test']['uauc']:.4f}")
    return {**out, "seconds": {"train": 0.0, "eval": time.perf_counter() - started}, "paired": paired,
            "baselines": counting_rows(floor, data.test),
            "samples": {**data.sizes(), "valid_scored": len(data.valid), "test_scored": len(data.test)}}


METHODS = [Method("icl", "Zero-shot LLM (TALLRec prompt, Yes/No logit score), no tuning.", DEFAULTS, run,
                  validate=validate, nullable=MODEL_NULLABLE,
                  needs=lambda c: Needs.ctr(c["samples"]["history_len"]),
                  smoke={"model.name": "tiny-random", "samples.valid_size": 8, "samples.test_size": 12})]

FULL_TEST_SIZE = 2000  # the same 2,000 test samples as TALLRec's full profile (methods.tallrec.FULL_TEST_SIZE)
EXPERIMENTS = [
    Experiment("icl", "icl", table="TALLRec: ICL vs instruction tuning (AUC)",
               quick={"samples.test_size": 200, "samples.valid_size": 32},
               full={"samples.test_size": FULL_TEST_SIZE, "samples.valid_size": 128}),
]
