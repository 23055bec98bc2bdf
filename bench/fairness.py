"""Benchmark and tables of the FaiRLLM prompt audit (`recalign run fairllm`).

speed: the audit's generation path (all prompts of the entities batched together, each row stopped at its
    K-th list item) against a one-prompt-at-a-time loop, on the same audit prompts, same model, same process.
    Modes run interleaved (A, B, A, B, ...) so that load from other processes hits each alike; prompts/s and
    generated tokens per mode, the speed-up and the share of answers that are identical between modes.

        OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/fairness.py speed [--prompts 16] [--k 10] [--batch 16]
            [--rounds 1] [--modes batched,single] [--model smollm2-135m-instruct]

rescore: the generations of a finished audit run measured again with another title matching or SERP* scale
    (no generation: lists.json holds every answer), e.g. to set SERP* beside the paper's figures.

        .venv/bin/python bench/fairness.py rescore runs/fair-base [--match title_year] [--serp-scale reference]

table: SNSR (with the bootstrap interval) per attribute and similarity, for one or more finished audit runs
    side by side (e.g. the base model and a tuned adapter), as Markdown.

        .venv/bin/python bench/fairness.py table runs/fair-base runs/fair-bigrec [--metrics jaccard,prag]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "fairness-speed.json"
NAMES = {"jaccard": "Jaccard", "serp": "SERP*", "prag": "PRAG*"}


def audit_prompts(backbone, n: int, k: int) -> list[str]:
    from recalign.data import load_dataset
    from recalign.llm import Prompter
    from recalign.tasks.fairness import ENTITIES, FAIRLLM_PROMPT, AuditPlan, load_attributes, pick_entities

    ds = load_dataset("ml-100k")
    plan = AuditPlan(pick_entities(ds, {**ENTITIES, "count": 20}, 0), load_attributes(["paper"]), "a")
    p = FAIRLLM_PROMPT
    prompter = Prompter({"instruction": p["template"], "input": ""}, backbone.tokenizer, p["wrapper"],
                        p["system"].format(noun="movie"))
    return [prompter.render(f) for f in plan.fields(k, "movie")[:n]]


def speed(args) -> dict:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from recalign.llm import Backbone
    from recalign.tasks.fairness import list_complete

    class ListEnd(StoppingCriteria):  # what `recalign run fairllm` stops rows with (generate.stop_at_list_end)
        def __call__(self, input_ids, scores, **kwargs):
            tails = backbone.tokenizer.batch_decode(input_ids[:, -40:], skip_special_tokens=True)
            return torch.tensor([list_complete(t, args.k) for t in tails], device=input_ids.device)

    backbone = Backbone.load(args.model, batch_size=args.batch)
    prompts = audit_prompts(backbone, args.prompts, args.k)
    max_new = 16 * args.k + 16
    stop = StoppingCriteriaList([ListEnd()])
    modes = {
        "batched": dict(batch_size=args.batch, stopping_criteria=stop),
        "batched-nostop": dict(batch_size=args.batch),
        "single": dict(batch_size=1, stopping_criteria=stop),
        "single-nostop": dict(batch_size=1),
    }
    chosen = args.modes.split(",")
    runs = {m: [] for m in chosen}
    texts, tokens = {}, {}
    backbone.generate(prompts[:2], max_new_tokens=8, batch_size=2)  # warm-up
    for _ in range(args.rounds):
        for mode in chosen:
            started = time.perf_counter()
            out = backbone.generate(prompts, max_new_tokens=max_new, **modes[mode])
            runs[mode].append(time.perf_counter() - started)
            texts[mode] = [t[0] for t in out.texts]
            tokens[mode] = sum(len(t[0]) for t in out.token_ids)
            print(f"{mode}: {runs[mode][-1]:.1f}s, {tokens[mode]} tokens", flush=True)
    result = {
        "model": args.model, "precision": backbone.precision, "prompts": len(prompts), "k": args.k,
        "batch": args.batch, "max_new_tokens": max_new, "rounds": args.rounds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_start_end": None,
        "modes": {m: {"seconds_median": statistics.median(v), "seconds": v,
                      "prompts_per_second": len(prompts) / statistics.median(v), "tokens": tokens[m]}
                  for m, v in runs.items()},
    }
    base = chosen[0]
    for mode in chosen[1:]:
        result["modes"][mode]["speedup_of_" + base] = (result["modes"][mode]["seconds_median"]
                                                       / result["modes"][base]["seconds_median"])
        result["modes"][mode]["same_text_as_" + base] = sum(a == b for a, b in zip(texts[base], texts[mode])) / len(prompts)
    return result


def table(args) -> str:
    metrics = [m for m in args.metrics.split(",")]
    runs = []
    for path in args.runs:
        data = json.loads((Path(path) / "metrics.json").read_text())
        if data.get("method") != "fairllm":
            raise SystemExit(f"{path}: not a fairllm run")
        runs.append((Path(path).name, data))
    k = runs[0][1]["audit"]["k"]
    header = ["attribute"] + [f"{NAMES[m]}@{k} SNSR ({name})" for m in metrics for name, _ in runs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for attribute in runs[0][1]["attributes"]:
        cells = [attribute]
        for m in metrics:
            for _, data in runs:
                entry = data["attributes"].get(attribute, {}).get(m)
                if entry is None or entry.get("snsr") is None:
                    cells.append("–")
                    continue
                ci = entry.get("snsr_ci") or [None, None]
                cells.append(f"{entry['snsr']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else ""))
        lines.append("| " + " | ".join(cells) + " |")
    means = ["mean similarity"] + [f"{data['test'].get(f'{m}@{k}', float('nan')):.3f}" for m in metrics
                                   for _, data in runs]
    lines.append("| " + " | ".join(means) + " |")
    return "\n".join(lines)


def rescore(args) -> dict:
    from recalign.tasks.fairness import AuditPlan, audit_metrics, headline_metrics, list_keys

    run = Path(args.run)
    metrics = json.loads((run / "metrics.json").read_text())
    rows = json.loads((run / "lists.json").read_text())
    audit = metrics["audit"]
    attributes = {a: list(per["jaccard"]["values"]) for a, per in metrics["attributes"].items()}
    neutral = rows[0]["value"]
    plan = AuditPlan(audit["entity_names"], attributes, neutral)
    if [(r["entity"], r["value"]) for r in rows] != plan.units():
        raise SystemExit(f"{run}: lists.json does not match the audit plan")
    keys = [list_keys(r["text"], args.match == "title_year") for r in rows]
    k = audit["k"]
    import yaml

    seed = int((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("seed", 0))
    out = audit_metrics(plan, keys, k, args.serp_scale, audit.get("bootstrap", 1000), seed)
    return {"run": str(run), "match": args.match, "serp_scale": args.serp_scale, "test": headline_metrics(out, k),
            "mean_titles": sum(min(len(x), k) for x in keys) / len(keys), "attributes": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--prompts", type=int, default=16)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--rounds", type=int, default=1)
    s.add_argument("--modes", default="batched,single")
    s.add_argument("--model", default="smollm2-135m-instruct")
    s.add_argument("--out", default=str(RESULTS))
    r = sub.add_parser("rescore")
    r.add_argument("run")
    r.add_argument("--match", default="title", choices=["title", "title_year"])
    r.add_argument("--serp-scale", default="spec", choices=["spec", "reference"])
    r.add_argument("--out", default="")
    t = sub.add_parser("table")
    t.add_argument("runs", nargs="+")
    t.add_argument("--metrics", default="jaccard,serp,prag")
    args = parser.parse_args()
    if args.command == "speed":
        load = os.getloadavg()[0]
        result = speed(args)
        result["load_average_start_end"] = [load, os.getloadavg()[0]]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["modes"], indent=2))
    elif args.command == "rescore":
        result = rescore(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        k = json.loads((Path(args.run) / "metrics.json").read_text())["audit"]["k"]
        print(f"mean distinct titles per list: {result['mean_titles']:.2f}")
        for attribute, per in result["attributes"].items():
            print(attribute, " ".join(f"{NAMES[m]}@{k} SNSR {per[m]['snsr']:.3f} [{per[m]['snsr_ci'][0]:.3f}, "
                                      f"{per[m]['snsr_ci'][1]:.3f}]" for m in NAMES))
        print({m: round(v, 4) for m, v in result["test"].items() if "_sn" not in m})
    else:
        print(table(args))


if __name__ == "__main__":
    main()
