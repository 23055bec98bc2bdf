"""ICL: zero-shot prompting of the base LLM with TALLRec's prompt, scored by logit(Yes) - logit(No).

No tuning. The seed's point: in-context learning alone is not enough (AUC near 0.5)."""

from __future__ import annotations

import copy
import time

from recalign.llm import MODEL_CONFIG, Backbone, ctr
from recalign.methods import Experiment, Method, RunContext

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "prompt": copy.deepcopy(ctr.TALLREC_PROMPT),
    "samples": copy.deepcopy(ctr.SAMPLE_DEFAULTS),
}


def _run(ctx: RunContext) -> dict:
    cfg = ctx.config
    ds = ctx.dataset
    started = time.perf_counter()
    backbone = Backbone.from_config(cfg["model"])
    data = ctr.prepare(ds, cfg["samples"])
    noun = cfg["data"].get("domain") or ds.domain
    ctx.log(f"ICL with {cfg['model']['name']}: {len(data.valid)} valid / {len(data.test)} test samples "
            f"(of {len(data.split.valid)} / {len(data.split.test)})")
    out = {}
    for name, frame in (("valid", data.valid), ("test", data.test)):
        prompts = ctr.render_prompts(ds, frame, cfg["prompt"], backbone.tokenizer, backbone.count_tokens, noun)
        scores = backbone.score_yes_no(prompts, cfg["prompt"]["yes"], cfg["prompt"]["no"], progress=f"ICL {name}")
        out[name] = ctr.evaluate(frame, scores.numpy())
        if name == "test":
            ctx.run.write_json("predictions.json", {"user": frame["user"].tolist(), "item": frame["item"].tolist(),
                                                    "label": frame["label"].tolist(), "score": scores.tolist()})
    ctx.log(f"ICL test AUC {out['test']['auc']:.4f} UAUC {out['test']['uauc']:.4f}")
    return {**out, "seconds": {"train": 0.0, "eval": time.perf_counter() - started},
            "samples": {**data.split.sizes(), "valid_scored": len(data.valid), "test_scored": len(data.test)}}


METHOD = Method("icl", "Zero-shot LLM (TALLRec prompt, Yes/No logit score), no tuning.", DEFAULTS, _run,
                validate=lambda c: ctr.validate(c))

EXPERIMENTS = [
    Experiment("icl", "icl", table="TALLRec: ICL vs instruction tuning (AUC)",
               quick={"samples.test_size": 200, "samples.valid_size": 32},
               full={"samples.test_size": 1000, "samples.valid_size": 128}),
]
