"""RecInterpreter: can the LLM read a sequential recommender's latent space? (Yang et al., 2023)

A sequential recommender (SASRec, GRU4Rec, Caser, any sequential model of `recalign.cf`) is trained on the
training period and frozen. Its per-position hidden states of a window of L items go through a small
projector (`llm.slots.SeqProjector`: a convolution over the L positions, then Linear to the LLM's hidden
size) into one soft token (k as an option) of a frozen LLM's prompt; only the projector is trained (LoRA
optional), with the LM loss on the answer. Two probes, each with its own projector:

- recovery: "<SeqH>" holds all L items; the answer lists their titles. Scored by how many of the L titles
  the generation names (exact match on normalised titles, `tasks.interpret.TitleMatcher`): the mean, the
  distribution 0..L, and the precision of the named entries.
- residual: "<SeqH1>" holds the first L-1 items, "<SeqH2>" all L; the answer names the L-th. The named
  title is grounded to the catalogue (exact title first, then the L2 distance of frozen LLM embeddings,
  `eval.grounding`); top-1 / top-5 accuracy, List1's items excluded.

Controls on the same test windows: the projector fed random vectors (`_random`: what the prompt alone
gives), the hidden states of another user's window (`_shuffled`), the titles as text in the prompt
(`_text`, the frozen LLM zero-shot: what reading the plain list gives), and popularity (`_pop`: the L most
popular training items named; the most popular items as the residual).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from recalign.cf.checks import check_model_settings
from recalign.data import Needs
from recalign.errors import InputError
from recalign.llm import (LORA_CONFIG, MODEL_CONFIG, MODEL_NULLABLE, Backbone, LoraSettings, Prompter, TrainConfig,
                          check_lora, check_model, check_train, fill, generate_step, train_section,
                          train_slot_modules)
from recalign.llm.prompts import check_template
from recalign.llm.slots import SeqProjector
from recalign.methods.api import Experiment, Method, RunContext
from recalign.tasks.interpret import (PROBE_SAMPLES, TitleMatcher, bootstrap_interval, check_probe_samples,
                                      named_item_text, other_user_rows, popularity_ranks, probe_windows,
                                      proportion_interval, ratio_interval, recovery_counts, recovery_metrics,
                                      residual_metrics, sequences)
from recalign.tasks.text import quote_titles

PROBES = ("recovery", "residual")
CONTROLS = ("random", "shuffled", "text", "pop")
SLOTS = {"recovery": ("<SeqH>",), "residual": ("<SeqH1>", "<SeqH2>")}
ANSWER_FIELD = {"recovery": "titles", "residual": "title"}

DEFAULTS = {
    "model": copy.deepcopy(MODEL_CONFIG),
    "samples": copy.deepcopy(PROBE_SAMPLES),
    "encoder": {
        "model": "sasrec",  # any sequential model of `recalign methods` (sasrec, gru4rec, caser, ...)
        "params": {},  # its hyper-parameters; max_len defaults to samples.length
        "train": {"epochs": 0, "max_minutes": 0.0},  # 0 = the CF trainer's default (early stopping on valid)
    },
    "projector": {"tokens": 1, "pooling": "conv"},  # k soft tokens per representation; conv | mean | last
    "probes": ["recovery", "residual"],
    "prompt": {
        "wrapper": "auto",  # auto | chat | alpaca | plain
        "system": "",
        "with_year": False,  # titles in answers (and text prompts) with "(year)": more tokens to generate
        "append_eos": True,  # train the answer followed by the end token, so generation learns to stop
        # the answer's fixed opening ("This user has watched") is written after the prompt, so training and
        # generation start at the content: a 135M LLM did not take up the answer's frame from one soft token
        # within a short training (it kept its own "The movie in List2 is not in List1."); the zero-shot text
        # control then lists titles too
        "prefill": True,
        # the reference's prompts and answers; {noun}/{nouns} follow data.domain
        "recovery": {
            "instruction": ("A person has watched a series of {nouns}. The watching list can be represented as: "
                            "<SeqH>. Describe this watching history of the person in detail."),
            "input": "",
            "answer": "This user has watched {titles} in the previous.",
        },
        "residual": {
            "instruction": ("A person has watched a series of {nouns}. The watching list can be represented as "
                            "List1: <SeqH1>. After watching another {noun}, the watching list can further be "
                            "represented as List2: <SeqH2>. What is the {noun} in List2 but not in List1?"),
            "input": "",
            "answer": "This user watched {noun} {title} in List2 but not in List1.",
        },
    },
    "lora": {**copy.deepcopy(LORA_CONFIG), "tune": False},  # tune: LoRA trained with the projector
    "train": train_section(epochs=2, batch_size=4, lr=3e-2, patience=2),  # lr from the valid loss of two trial runs
    "generate": {"recovery_tokens": 64, "residual_tokens": 24, "batch_size": 0},  # greedy; 0 = model.batch_size
    "grounding": {"pooling": "last", "batch_size": 64, "cache_dir": ""},  # "" = $RECALIGN_HOME/grounding
    "eval": {"controls": list(CONTROLS), "mask_list1": True, "bootstrap": 2000},
}


# ---------------------------------------------------------------------------------------------- checks
def validate(cfg: dict) -> None:
    from recalign.cf import MODELS, model_class

    check_model(cfg["model"], training=True)
    check_probe_samples(cfg["samples"])
    enc = cfg["encoder"]
    if enc["model"] not in MODELS:
        raise InputError(f"encoder.model: unknown model {enc['model']!r}; known: {', '.join(MODELS)}")
    cls = model_class(enc["model"])
    if cls.kind != "sequential":
        sequential = [n for n in MODELS if model_class(n).kind == "sequential"]
        raise InputError(f"encoder.model: {enc['model']} is not a sequential recommender (it has no per-position "
                         f"hidden states); use one of {', '.join(sequential)}")
    unknown = sorted(set(enc["params"]) - set(cls.defaults))
    if unknown:
        raise InputError(f"encoder.params: unknown {enc['model']} parameter(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(cls.defaults))}")
    check_model_settings({**cls.defaults, **enc["params"]}, "encoder.params")  # with the sizes it combines with
    max_len = enc["params"].get("max_len")
    if max_len is not None and max_len < cfg["samples"]["length"]:
        raise InputError(f"samples.length={cfg['samples']['length']} is larger than the encoder's "
                         f"encoder.params.max_len={max_len}: it cannot encode the whole window")
    for key, value in enc["train"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise InputError(f"encoder.train.{key}: expected a finite number >= 0 (0 = the default), got {value!r}")
    proj = cfg["projector"]
    if isinstance(proj["tokens"], bool) or not isinstance(proj["tokens"], int) or proj["tokens"] < 1:
        raise InputError(f"projector.tokens: expected an integer >= 1, got {proj['tokens']!r}")
    if proj["pooling"] not in SeqProjector.POOLINGS:
        raise InputError(f"projector.pooling: expected one of {', '.join(SeqProjector.POOLINGS)}, "
                         f"got {proj['pooling']!r}")
    probes = cfg["probes"]
    if not isinstance(probes, list) or not probes or any(p not in PROBES for p in probes) or len(set(probes)) < len(probes):
        raise InputError(f"probes: expected a non-empty list of {' and '.join(PROBES)}, got {probes!r}")
    controls = cfg["eval"]["controls"]
    if not isinstance(controls, list) or any(c not in CONTROLS for c in controls):
        raise InputError(f"eval.controls: expected a list of {', '.join(CONTROLS)}, got {controls!r}")
    prompt = cfg["prompt"]
    fields = {"noun": "movie", "nouns": "movies"}
    for probe in PROBES:
        section = prompt[probe]
        check_template({**section, "wrapper": prompt["wrapper"]}, f"prompt.{probe}", fields)
        text = section["instruction"] + section["input"]
        for slot in SLOTS[probe]:
            if text.count(slot) != 1:
                raise InputError(f"prompt.{probe}: the template must contain {slot} exactly once "
                                 f"(found {text.count(slot)})")
        answer = section["answer"]
        if answer.count("{" + ANSWER_FIELD[probe] + "}") != 1:
            raise InputError(f"prompt.{probe}.answer: must contain {{{ANSWER_FIELD[probe]}}} exactly once")
        fill(answer, f"prompt.{probe}.answer", **fields, **{ANSWER_FIELD[probe]: "t"})
    check_lora(cfg["lora"])
    check_train(cfg["train"])
    for key in ("recovery_tokens", "residual_tokens"):
        if cfg["generate"][key] < 1:
            raise InputError(f"generate.{key} must be >= 1, got {cfg['generate'][key]}")
    if cfg["grounding"]["pooling"] not in ("last", "mean"):
        raise InputError(f"grounding.pooling: expected last or mean, got {cfg['grounding']['pooling']!r}")


# ---------------------------------------------------------------------------------------------- encoder
def train_encoder(ctx: RunContext, windows: dict):
    """The sequential recommender on every interaction of the training period, early-stopped on the valid
    windows' next items; frozen."""
    from recalign.cf import model_class, train_cf_model

    enc, ds, length = ctx.config["encoder"], ctx.dataset, ctx.config["samples"]["length"]
    params = dict(enc["params"])
    if "max_len" in model_class(enc["model"]).defaults:
        params.setdefault("max_len", length)
    period = ds.interactions[ds.interactions["timestamp"] <= windows["cutoff"]]
    train = {k: v for k, v in enc["train"].items() if v}
    model = train_cf_model(enc["model"], period, {"model": params, "train": train}, catalog=ds,
                           valid=windows["valid_all"], run=ctx.run, checkpoint=f"encoder-{enc['model']}",
                           seed=ctx.seed, log=lambda m: ctx.log(f"encoder: {m}"))
    if model.max_len is not None and model.max_len < length:
        raise InputError(f"samples.length={length} is larger than the encoder's max_len={model.max_len}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def encoder_valid(model) -> float | None:
    """The encoder's best early-stopping score: NDCG@10 of each valid window's last item given the others."""
    scores = [row["valid"] for row in getattr(model, "train_summary", {}).get("history", []) if "valid" in row]
    return max(scores) if scores else None


@torch.no_grad()
def encode(model, frame, length: int) -> dict[str, torch.Tensor]:
    """Hidden states [N, L, d] of each window (`list2`) and of its first L-1 items (`list1`, left-padded to L,
    zero at the padding position)."""
    from recalign.cf import make_query

    seqs = sequences(frame)
    out = {}
    for name, rows in (("list2", seqs), ("list1", [s[:-1] for s in seqs])):
        query = make_query(frame["user"].to_numpy(), [np.asarray(r) for r in rows], model.n_items)
        if query.history.shape[1] < length:  # every List1 is one short: pad to L on the left
            pad = torch.full((len(rows), length - query.history.shape[1]), model.n_items, dtype=torch.long)
            query.history = torch.cat([pad, query.history], 1)
        states = model.hidden_states(query)[:, -length:].float()
        out[name] = states * (query.history[:, -length:] != model.n_items).unsqueeze(-1)
    return out


def random_states(train: dict[str, torch.Tensor], n: int, seed: int) -> dict[str, torch.Tensor]:
    """Gaussian states with the training windows' mean and std per position and dimension."""
    generator = torch.Generator().manual_seed(seed)
    return {name: states.mean(0) + states.std(0) * torch.randn((n, *states.shape[1:]), generator=generator)
            for name, states in train.items()}


class Tuned(nn.Module):
    """The projector (+ the LoRA weights when they are tuned too): what is trained and checkpointed."""

    def __init__(self, projector: SeqProjector, lora_model: nn.Module | None):
        super().__init__()
        self.projector = projector
        self.lora = nn.ParameterDict()
        if lora_model is not None:
            for name, parameter in lora_model.named_parameters():
                if "lora_" in name:
                    parameter.requires_grad_(True)
                    self.lora[name.replace(".", "__")] = parameter


# ---------------------------------------------------------------------------------------------- text
def title_texts(ds, with_year: bool) -> list[str]:
    """How a title is written in answers and text prompts (ML-100K keeps its "Usual Suspects, The" form)."""
    return ds.titles() if with_year else [str(t).strip() for t in ds.items["title"]]


def slot_fills(probe: str, projector: SeqProjector, states: dict[str, torch.Tensor], rows) -> dict:
    rows = torch.as_tensor(rows, dtype=torch.long)
    if probe == "recovery":
        return {"<SeqH>": projector(states["list2"][rows])}
    return {"<SeqH1>": projector(states["list1"][rows]), "<SeqH2>": projector(states["list2"][rows])}


def answer_frame(probe: str, template: str, noun: str, prefill: bool) -> tuple[str, str]:
    """(the answer template with only its {titles}/{title} field left, the prefilled opening ("" without
    prefill))."""
    field = "{" + ANSWER_FIELD[probe] + "}"
    frame = fill(template, f"prompt.{probe}.answer", noun=noun, nouns=f"{noun}s", **{ANSWER_FIELD[probe]: field})
    return frame, frame.partition(field)[0].rstrip() if prefill else ""


def answers(probe: str, frame, titles: list[str], template: str, opening: str, eos: str) -> list[str]:
    """The trained answer per window (after the prefilled `opening`)."""
    out = []
    for seq in sequences(frame):
        value = ", ".join(titles[i] for i in seq) if probe == "recovery" else titles[seq[-1]]
        out.append(template.replace("{" + ANSWER_FIELD[probe] + "}", value)[len(opening):] + eos)
    return out


def text_prompts(probe: str, prompt: str, frame, titles: list[str]) -> list[str]:
    """The slot prompt with the titles written where the representations were (the text control)."""
    out = []
    for seq in sequences(frame):
        if probe == "recovery":
            out.append(prompt.replace("<SeqH>", quote_titles([titles[i] for i in seq])))
        else:
            out.append(prompt.replace("<SeqH1>", quote_titles([titles[i] for i in seq[:-1]]))
                       .replace("<SeqH2>", quote_titles([titles[i] for i in seq])))
    return out


def generate_slots(store, backbone: Backbone, prompt: str, fills, n: int, name: str, max_new_tokens: int,
                   batch_size: int, block: int = 32) -> list[str]:
    """Greedy generation of one slot prompt for n representations (`fills(rows)` -> slots), checkpointed as
    `generations-NAME` every block (a rerun continues where it stopped). `llm.generate_step` takes no slots."""
    from recalign.progress import track

    state = store.load_checkpoint(f"generations-{name}") or {"texts": []}
    for start in track(range(len(state["texts"]), n, block), f"generating {name}"):
        rows = list(range(start, min(n, start + block)))
        with torch.no_grad():
            slots = {k: v.detach() for k, v in fills(rows).items()}
        out = backbone.generate([prompt] * len(rows), max_new_tokens=max_new_tokens, slots=slots,
                                batch_size=batch_size or None)
        state["texts"].extend(row[0] for row in out.texts)
        store.save_checkpoint(f"generations-{name}", state)
    return state["texts"]


@torch.no_grad()
def answer_nll(backbone: Backbone, prompts: list[str], targets: list[str], fills=None, batch_size: int = 8) -> np.ndarray:
    """Per window: the mean negative log-likelihood per token of its true answer (teacher-forced; `fills(rows)`
    gives the slots). Sensitive where greedy generation collapses onto one answer: a projector that carries
    the window's content gives its own window's answer a lower NLL than another window's representation does.
    (`Backbone.lm_loss` reduces over the batch, so the per-row loss is computed here.)"""
    out = np.zeros(len(prompts))
    with backbone.evaluating():
        for start in range(0, len(prompts), batch_size):
            rows = list(range(start, min(len(prompts), start + batch_size)))
            slots = fills(rows) if fills else None
            slot_k = {k: (1 if v.dim() == 2 else int(v.shape[1])) for k, v in slots.items()} if slots else None
            enc = backbone.encode([prompts[i] for i in rows], [targets[i] for i in rows], slot_k=slot_k)
            keep = int(enc.answer_lengths.max()) + 1
            logits = backbone.logits(enc, slots, keep=keep).float()
            logprobs = torch.log_softmax(logits[:, :-1], -1)
            tokens = enc.input_ids[:, -keep + 1:]
            picked = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, keep-1]
            for j, row in enumerate(rows):
                n = int(enc.answer_lengths[j])
                out[row] = -float(picked[j, picked.shape[1] - n:].mean())
    return out


# ---------------------------------------------------------------------------------------------- grounding
def catalogue_embeddings(ctx: RunContext, backbone: Backbone, texts: list[str], base_id: str) -> torch.Tensor:
    from recalign import assets
    from recalign.eval.grounding import CatalogueCache

    g = ctx.config["grounding"]
    cache = CatalogueCache(g["cache_dir"] or (assets.home() / "grounding"))
    return cache.get(texts, lambda batch: backbone.embed(batch, pooling=g["pooling"], batch_size=g["batch_size"],
                                                         adapter=False, progress="embedding the catalogue"),
                     base_id, extra=f"pooling={g['pooling']}")[0]


def residual_ranks(backbone: Backbone, names: list[str], matcher: TitleMatcher, catalogue: torch.Tensor,
                   frame, cfg: dict) -> tuple[np.ndarray, list[int]]:
    """(0-based rank of the added item, the top item) per window: items whose title the answer names exactly
    come first, the rest by L2 distance of the frozen LLM's embeddings; List1's items are not candidates."""
    from recalign.eval import target_ranks
    from recalign.eval.grounding import l2_distances

    g = cfg["grounding"]
    queries = backbone.embed([n or " " for n in names], pooling=g["pooling"], batch_size=g["batch_size"], adapter=False)
    distances = l2_distances(queries, catalogue)
    for row, name in enumerate(names):
        exact = list(matcher.items_named(name))
        if exact:
            distances[row, exact] = -1.0
    seqs = sequences(frame)
    exclude = None
    if cfg["eval"]["mask_list1"]:
        exclude = torch.zeros_like(distances, dtype=torch.bool)
        for row, seq in enumerate(seqs):
            exclude[row, list(seq[:-1])] = True
    targets = torch.tensor([s[-1] for s in seqs], dtype=torch.long)
    ranks = target_ranks(-distances, targets, exclude).numpy()
    masked = distances.masked_fill(exclude, float("inf")) if exclude is not None else distances
    return ranks, masked.argmin(1).tolist()


# ---------------------------------------------------------------------------------------------- run
def run(ctx: RunContext) -> dict:
    cfg, ds, seed = ctx.config, ctx.dataset, ctx.seed
    length, noun = cfg["samples"]["length"], ctx.noun
    windows = probe_windows(ds, cfg["samples"], seed)
    ctx.log(f"RecInterpreter: L={length}; {len(windows['train'])} training windows, {len(windows['valid'])} valid, "
            f"{len(windows['test'])} test (of {windows['sizes']})")
    seconds = {"encoder": 0.0, "train": 0.0, "eval": 0.0}

    started = time.perf_counter()
    encoder = train_encoder(ctx, windows)
    states = {split: encode(encoder, windows[split], length) for split in ("train", "valid", "test")}
    seconds["encoder"] = time.perf_counter() - started
    test, n_test = windows["test"], len(windows["test"])
    controls = cfg["eval"]["controls"]
    shuffled = other_user_rows(test["user"].to_numpy())
    test_states = {"": states["test"],
                   "_random": random_states(states["train"], n_test, seed + 1),
                   "_shuffled": {k: v[torch.as_tensor(shuffled)] for k, v in states["test"].items()}}

    backbone = ctx.backbone()
    from recalign.eval.grounding import model_fingerprint

    base_id = model_fingerprint(backbone.causal_lm, cfg["model"]["name"])
    pcfg = cfg["prompt"]
    titles = title_texts(ds, pcfg["with_year"])
    matcher = TitleMatcher(titles)
    eos = backbone.tokenizer.eos_token if pcfg["append_eos"] and backbone.tokenizer.eos_token else ""
    seqs = sequences(test)
    popularity = np.bincount(ds.interactions[ds.interactions["timestamp"] <= windows["cutoff"]]["item"],
                             minlength=ds.n_items)
    metrics, cases, intervals, training = {}, {"sequence": [[titles[i] for i in s] for s in seqs]}, {}, {}
    draws = int(cfg["eval"]["bootstrap"])

    def interval(name: str, values) -> None:
        intervals[name] = bootstrap_interval(values, draws, seed) if draws else None

    def hit_intervals(ranks, suffix: str) -> None:  # Wilson: a bootstrap of 0 hits is [0, 0]
        for k in (1, 5):
            intervals[f"residual_top{k}{suffix}"] = proportion_interval(np.asarray(ranks) < k)

    catalogue = None
    for probe in cfg["probes"]:
        section = pcfg[probe]
        prompter = Prompter(section, backbone.tokenizer, pcfg["wrapper"], pcfg["system"], where=f"prompt.{probe}",
                            require=SLOTS[probe])
        template, opening = answer_frame(probe, section["answer"], noun, pcfg["prefill"])
        prompt = prompter.render({"noun": noun, "nouns": f"{noun}s"}) + opening
        max_tokens = int(cfg["generate"][f"{probe}_tokens"])
        batch_size = int(cfg["generate"]["batch_size"])
        texts: dict[str, list[str]] = {}

        started = time.perf_counter()
        test_answers = answers(probe, test, titles, template, opening, eos)
        if "text" in controls:  # the frozen base LLM, before any adapter is trained
            backbone.remove_lora()
            prompts = text_prompts(probe, prompt, test, titles)
            texts["_text"] = [row[0] for row in generate_step(
                ctx.run, backbone, prompts, f"{probe}-text", 1, max_tokens, batch_size)["texts"]]
            if ctx.run.load_checkpoint(f"nll-{probe}-text") is None:
                ctx.run.save_checkpoint(f"nll-{probe}-text", {"text": answer_nll(
                    backbone, prompts, test_answers, batch_size=batch_size or backbone.batch_size)})
        seconds["eval"] += time.perf_counter() - started

        # ---- train the projector (+ LoRA) on the answer's LM loss
        started = time.perf_counter()
        torch.manual_seed(seed)
        backbone.remove_lora()
        if cfg["lora"]["tune"]:
            backbone.add_lora(LoraSettings.from_config(cfg["lora"]))
        for parameter in backbone.model.parameters():
            parameter.requires_grad_(False)
        projector = SeqProjector(length, states["train"]["list2"].shape[-1], backbone.hidden_size,
                                 cfg["projector"]["tokens"], cfg["projector"]["pooling"])
        tuned = Tuned(projector, backbone.model if cfg["lora"]["tune"] else None)
        train_answers = answers(probe, windows["train"], titles, template, opening, eos)
        valid_answers = answers(probe, windows["valid"], titles, template, opening, eos)

        def loss_fn(batch: list[int], probe=probe, prompt=prompt, train_answers=train_answers, projector=projector):
            return backbone.lm_loss([prompt] * len(batch), [train_answers[i] for i in batch],
                                    slots=slot_fills(probe, projector, states["train"], batch))

        @torch.no_grad()
        def valid_score(probe=probe, prompt=prompt, valid_answers=valid_answers, projector=projector) -> float:
            total, count, size = 0.0, 0, int(cfg["train"]["batch_size"])
            for start in range(0, len(valid_answers), size):
                rows = list(range(start, min(len(valid_answers), start + size)))
                loss, n = backbone.lm_loss([prompt] * len(rows), [valid_answers[i] for i in rows],
                                           slots=slot_fills(probe, projector, states["valid"], rows))
                total, count = total + loss.item() * n, count + n
            return -total / max(1, count)  # mean answer-token loss, negated: higher = better

        training[probe] = train_slot_modules(ctx.run, backbone, tuned, TrainConfig.from_config(cfg["train"], seed),
                                             len(train_answers), loss_fn, valid_score, f"projector-{probe}",
                                             log=lambda m, probe=probe: ctx.log(f"{probe}: {m}"))
        training[probe] = {k: training[probe].get(k) for k in ("steps", "epochs_run", "best_score", "best_step",
                                                                "tokens", "seconds", "history")}
        seconds["train"] += time.perf_counter() - started
        tuned.eval()

        # ---- the true answers' likelihood, then generation, from the representations and the controls
        started = time.perf_counter()
        nll = {**(ctx.run.load_checkpoint(f"nll-{probe}") or {}), **(ctx.run.load_checkpoint(f"nll-{probe}-text") or {})}
        for suffix, source in test_states.items():
            key = suffix[1:] or "model"
            if (not suffix or key in controls) and key not in nll:
                nll[key] = answer_nll(backbone, [prompt] * n_test, test_answers,
                                      lambda rows, source=source, probe=probe, projector=projector:
                                      slot_fills(probe, projector, source, rows), batch_size or backbone.batch_size)
        ctx.run.save_checkpoint(f"nll-{probe}", nll)
        for key, values in nll.items():
            suffix = "" if key == "model" else f"_{key}"
            metrics[f"{probe}_nll{suffix}"] = float(np.mean(values))
            interval(f"{probe}_nll{suffix}", values)
        nll = {("" if k == "model" else f"_{k}"): v for k, v in nll.items()}
        for suffix in ("_shuffled", "_random"):
            if suffix in nll:
                gap = np.asarray(nll[suffix]) - np.asarray(nll[""])
                metrics[f"{probe}_nll_gap{suffix}"] = float(gap.mean())
                interval(f"{probe}_nll_gap{suffix}", gap)
        for suffix, source in test_states.items():
            if suffix and suffix[1:] not in controls:
                continue
            texts[suffix] = generate_slots(
                ctx.run, backbone, prompt, lambda rows, source=source, probe=probe, projector=projector:
                slot_fills(probe, projector, source, rows), n_test, f"{probe}{suffix}", max_tokens, batch_size)
        texts = {suffix: [opening + t for t in generated] for suffix, generated in texts.items()}
        for suffix, generated in texts.items():
            cases[f"{probe}{suffix}"] = generated
        if probe == "recovery":
            for suffix, generated in texts.items():
                recovered, named = recovery_counts(matcher, generated, seqs, template, ANSWER_FIELD[probe])
                metrics.update(recovery_metrics(recovered, named, length, suffix))
                interval(f"recovery_mean{suffix}", recovered)
                if draws:
                    intervals[f"recovery_precision{suffix}"] = ratio_interval(recovered, named, draws, seed)
                cases[f"recovered{suffix}"] = recovered.tolist()
            if "pop" in controls:
                top = set(np.argsort(-popularity, kind="stable")[:length].tolist())
                recovered = np.array([len(top & set(s)) for s in seqs])
                metrics.update(recovery_metrics(recovered, np.full(n_test, length), length, "_pop"))
                interval("recovery_mean_pop", recovered)
                if draws:
                    intervals["recovery_precision_pop"] = ratio_interval(recovered, np.full(n_test, length), draws, seed)
        else:
            if catalogue is None:
                catalogue = catalogue_embeddings(ctx, backbone, titles, base_id)
            for suffix, generated in texts.items():
                names = [named_item_text(matcher, t, template, ANSWER_FIELD[probe]) for t in generated]
                ranks, top = residual_ranks(backbone, names, matcher, catalogue, test, cfg)
                metrics.update(residual_metrics(ranks, suffix))
                hit_intervals(ranks, suffix)
                cases[f"residual_named{suffix}"] = names
                cases[f"residual_top{suffix}"] = [titles[i] for i in top]
            if "pop" in controls:
                excluded = [s[:-1] for s in seqs] if cfg["eval"]["mask_list1"] else [()] * n_test
                ranks = popularity_ranks(popularity, [s[-1] for s in seqs], excluded)
                metrics.update(residual_metrics(ranks, "_pop"))
                hit_intervals(ranks, "_pop")
        seconds["eval"] += time.perf_counter() - started
        ctx.log(f"{probe}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                         if k.startswith(probe) and isinstance(v, float)))

    ctx.run.write_json("cases-test.json", [{k: v[i] for k, v in cases.items()} for i in range(n_test)])
    dists = {k: metrics.pop(k) for k in [k for k in metrics if k.startswith("recovery_dist")]}
    alone = int((shuffled == np.arange(n_test)).sum())
    warnings = [f"{alone} of {n_test} test windows have no other user's window among the test windows: for them the "
                f"'another user's window' control is the window itself"] if "shuffled" in controls and alone else []
    warnings += [f"samples.{part}_size={cfg['samples'][f'{part}_size']} but the {part} period holds "
                 f"{len(windows[part])} windows; all of them were used" for part in ("train", "valid", "test")
                 if 0 < int(cfg["samples"][f"{part}_size"]) and len(windows[part]) < int(cfg["samples"][f"{part}_size"])]
    return {
        "test": {**metrics, "n": n_test}, "valid": {}, "warnings": warnings,
        "seconds": {"train": seconds["encoder"] + seconds["train"], "eval": seconds["eval"], **seconds},
        "recovery_distribution": dists, "intervals": intervals, "training": training,
        "encoder": {"model": encoder.name, "params": encoder.params, "valid_ndcg@10": encoder_valid(encoder),
                    "summary": getattr(encoder, "train_summary", {})},
        "samples": {**windows["sizes"], "train_windows": len(windows["train"]), "valid_windows": len(windows["valid"]),
                    "test_windows": n_test},
        "examples": [{k: v[i] for k, v in cases.items()} for i in range(min(5, n_test))],
    }


# ---------------------------------------------------------------------------------------------- report
def report(metrics: dict) -> str:
    from recalign.report.markdown import metrics_table

    test = metrics.get("test", {})
    labels = {"": "projected representation", "_random": "random vectors", "_shuffled": "another user's window",
              "_text": "titles as text (zero-shot)", "_pop": "popularity"}
    columns = ["recovery_mean", "recovery_precision", "recovery_nll", "residual_top1", "residual_top5", "residual_nll"]
    rows = []
    for suffix, label in labels.items():
        values = {c: test.get(f"{c}{suffix}") for c in columns}
        if any(v is not None for v in values.values()):
            rows.append((label, values))
    samples = metrics.get("samples", {})
    lines = [f"## Probes on {samples.get('test_windows', '?')} test windows "
             f"(encoder {metrics.get('encoder', {}).get('model', '?')})", "", metrics_table(rows, columns)]
    intervals = metrics.get("intervals", {})
    if intervals:
        lines += ["", "95% bootstrap intervals: " + "; ".join(
            f"{k} [{v[0]:.3f}, {v[1]:.3f}]" for k, v in intervals.items() if v)]
    dist = metrics.get("recovery_distribution", {})
    if dist:
        length = len(next(iter(dist.values()))) - 1
        lines += ["", "Share of test windows recovering k titles:", "",
                  "| | " + " | ".join(str(k) for k in range(length + 1)) + " |", "|---" * (length + 2) + "|"]
        for key, values in dist.items():
            label = labels.get(key.removeprefix("recovery_dist"), key)
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


SMOKE = {"model.name": "tiny-random", "samples.length": 4, "samples.train_size": 8, "samples.valid_size": 4,
         "samples.test_size": 6, "encoder.train.epochs": 1, "train.epochs": 1, "generate.recovery_tokens": 6,
         "generate.residual_tokens": 4, "eval.bootstrap": 100}
METHODS = [Method("recinterpreter", "RecInterpreter: a frozen sequential recommender's hidden states as soft tokens "
                                    "of a frozen LLM; recovery and residual probes with random/shuffled/text/pop "
                                    "controls.",
                  DEFAULTS, run, report=report, validate=validate, nullable=MODEL_NULLABLE, smoke=SMOKE,
                  needs=lambda c: Needs(min_items=2, top_k=5))]  # the residual probe's top-5

_TABLE = "RecInterpreter: can the LLM read the recommender's hidden states? (recovery / residual, controls)"
EXPERIMENTS = [
    # a few minutes on a quiet 2-core CPU: the residual probe at a tiny N, its controls but the text one
    Experiment("recinterpreter", "recinterpreter", table=_TABLE, profiles=("quick",),
               quick={"probes": ["residual"], "samples.train_size": 32, "samples.valid_size": 8,
                      "samples.test_size": 16, "encoder.train.max_minutes": 0.5, "train.epochs": 1,
                      "generate.residual_tokens": 16, "eval.controls": ["random", "shuffled", "pop"]}),
    # N in the thousands, 200 test windows, both probes per encoder: hours on a CPU
    *[Experiment(f"recinterpreter-{encoder}", "recinterpreter", table=_TABLE, profiles=("full",),
                 full={"encoder.model": encoder, "samples.train_size": 2048, "samples.test_size": 200,
                       "train.epochs": 2})
      for encoder in ("sasrec", "gru4rec", "caser")],
]
