"""Yes/No (CTR-style) recipe pieces shared by ICL, TALLRec and CoLLM: sample construction, prompt rendering
from config templates, bounded valid/test subsets, warm/cold slices, AUC/UAUC evaluation, item domains.

Samples are sliding windows over each user's time-sorted history (targets from position L on), split by the
target's global time (earliest 80% train, 10% valid, 10% test). Valid and test are optionally cut to a
random subset drawn with a FIXED seed (`samples.subset_seed`), so every method and every training seed is
evaluated on the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from recalign.data import Dataset, Split, history_samples, mark_warm_cold, temporal_split
from recalign.errors import InputError
from recalign.eval.metrics import ctr_metrics
from recalign.llm.prompts import Wrapper, fill, fit_history, quote_titles

TALLREC_PROMPT = {
    "wrapper": "auto",  # auto | chat | alpaca | plain
    "system": "",  # chat wrapper's system message ("" = empty, null = the chat template's default)
    "instruction": ("Given the user's preference and unpreference, identify whether the user will like the "
                    'target {noun} by answering "Yes." or "No.".'),
    "input": ("User Preference: {liked}\nUser Unpreference: {disliked}\n"
              "Whether the user will like the target {noun} {target}?"),
    "yes": "Yes.",
    "no": "No.",
    "max_tokens": 512,  # longer prompts drop their oldest history items (never the target)
}

SAMPLE_DEFAULTS = {
    "history_len": 10,
    "split": [0.8, 0.1, 0.1],
    "valid_size": 128,  # valid samples used for early stopping / reporting (0 = all)
    "test_size": 1000,  # test samples scored (0 = all)
    "subset_seed": 0,  # fixed: every method and seed sees the same valid/test subsets
}


@dataclass
class CTRData:
    """A split of history samples plus the (bounded) valid/test frames with warm/cold flags."""

    split: Split
    valid: pd.DataFrame
    test: pd.DataFrame


def prepare(ds: Dataset, samples_cfg: Mapping, liked_history_only: bool = False) -> CTRData:
    split_fracs = samples_cfg.get("split", [0.8, 0.1, 0.1])
    samples = history_samples(ds, int(samples_cfg.get("history_len", 10)), liked_history_only=liked_history_only)
    if samples.empty:
        raise InputError(f"{ds.name}: no user has more than samples.history_len="
                         f"{samples_cfg.get('history_len', 10)} interactions; nothing to build samples from")
    split = temporal_split(samples, tuple(split_fracs), by="count")
    seed = int(samples_cfg.get("subset_seed", 0))
    valid = subset(split.valid, int(samples_cfg.get("valid_size", 0)), seed)
    test = subset(split.test, int(samples_cfg.get("test_size", 0)), seed)
    return CTRData(split, mark_warm_cold(valid, split.train), mark_warm_cold(test, split.train))


def subset(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """A random subset of `size` rows drawn with `seed`, kept in their original order (all when size <= 0)."""
    if size <= 0 or size >= len(frame):
        return frame.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    return frame.iloc[np.sort(rng.choice(len(frame), size=size, replace=False))].reset_index(drop=True)


def render_prompts(ds: Dataset, frame: pd.DataFrame, prompt_cfg: Mapping, tokenizer, count_tokens=None,
                   noun: str | None = None) -> list[str]:
    """One prompt per sample row. Template fields: {liked}, {disliked} (quoted titles of the liked / disliked
    history items, oldest first), {history} (all history titles), {target} (quoted target title), {noun},
    {n_liked}, {n_disliked}. Placeholders such as <UserID> pass through untouched."""
    wrapper = Wrapper(prompt_cfg.get("wrapper", "auto"), system=prompt_cfg.get("system", ""), tokenizer=tokenizer)
    titles = ds.titles()
    noun = noun or ds.domain or "item"
    instruction_t, input_t = prompt_cfg["instruction"], prompt_cfg["input"]
    max_tokens = int(prompt_cfg.get("max_tokens") or 0)
    count = count_tokens or (lambda text: len(tokenizer(text)["input_ids"]))
    out = []
    for history, labels, target in zip(frame["history"], frame["history_labels"], frame["item"]):
        def render(k: int, history=history, labels=labels, target=target) -> str:
            items = history[len(history) - k:] if k else ()
            flags = labels[len(labels) - k:] if k else ()
            liked = [titles[i] for i, f in zip(items, flags) if f]
            disliked = [titles[i] for i, f in zip(items, flags) if not f]
            fields = {"liked": quote_titles(liked), "disliked": quote_titles(disliked),
                      "history": quote_titles([titles[i] for i in items]), "target": f'"{titles[target]}"',
                      "noun": noun, "n_liked": len(liked), "n_disliked": len(disliked)}
            return wrapper(fill(instruction_t, "prompt.instruction", **fields),
                           fill(input_t, "prompt.input", **fields))

        text, _ = fit_history(render, len(history), count, max_tokens)
        out.append(text)
    return out


def answers(labels: Sequence[bool], prompt_cfg: Mapping) -> list[str]:
    return [prompt_cfg["yes"] if bool(y) else prompt_cfg["no"] for y in labels]


def evaluate(frame: pd.DataFrame, scores) -> dict:
    """AUC/UAUC on all samples and on the warm / cold slices (warm = user and item seen in training)."""
    scores = np.asarray(scores, dtype=np.float64)
    users, labels = frame["user"].to_numpy(), frame["label"].to_numpy()
    out = ctr_metrics(users, labels, scores)
    if "warm" in frame:
        warm = frame["warm"].to_numpy()
        for name, mask in (("_warm", warm), ("_cold", ~warm)):
            if mask.sum():
                out.update(ctr_metrics(users[mask], labels[mask], scores[mask], prefix=name))
        out["n_warm"], out["n_cold"] = int(warm.sum()), int((~warm).sum())
    out["n"] = len(frame)
    return out


def domain_datasets(ds: Dataset, specs: Sequence[str], config_data: Mapping) -> list[tuple[str, Dataset]]:
    """Item domains for the cross-domain protocol.

    "genre:A|B|C": the run's dataset restricted to items with any of these categories; items that fall in
    more than one listed genre domain are dropped from all of them (domains are disjoint).
    Anything else: a dataset name or path, loaded like --dataset (same data.* options)."""
    from recalign.data import load_dataset

    genre_sets = {}
    for spec in specs:
        if spec.startswith("genre:"):
            wanted = {g.strip() for g in spec[len("genre:"):].split("|") if g.strip()}
            known = {g for cats in ds.items["categories"] for g in cats}
            unknown = sorted(wanted - known)
            if unknown or not wanted:
                raise InputError(f"cross.domains: {spec!r} names unknown genre(s) {', '.join(unknown) or '(none)'}; "
                                 f"known: {', '.join(sorted(known))}")
            genre_sets[spec] = {i for i, cats in enumerate(ds.items["categories"]) if wanted & set(cats)}
    counts: dict[int, int] = {}
    for items in genre_sets.values():
        for i in items:
            counts[i] = counts.get(i, 0) + 1
    out = []
    for spec in specs:
        if spec in genre_sets:
            items = np.array(sorted(i for i in genre_sets[spec] if counts[i] == 1))
            out.append((spec, ds.subset_items(items, name=f"{ds.name}[{spec}]")))
        else:
            out.append((spec, load_dataset(spec, fmt=config_data.get("format"),
                                           like_threshold=config_data.get("like_threshold"),
                                           k_core_users=config_data.get("k_core_users", 0),
                                           k_core_items=config_data.get("k_core_items", 0),
                                           domain=config_data.get("domain"))))
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


_DUMMY_FIELDS = {"liked": '"a"', "disliked": '"b"', "history": '"a", "b"', "target": '"c"', "noun": "movie",
                 "n_liked": 1, "n_disliked": 1}


def validate(config: Mapping, training: bool = False) -> None:
    """Check the model / prompt / samples (and lora / train) sections before anything runs or is written."""
    from recalign.llm.loading import check_source
    from recalign.llm.prompts import WRAPPERS

    check_source(config["model"]["name"])
    prompt = config["prompt"]
    if prompt["wrapper"] not in WRAPPERS:
        raise InputError(f"prompt.wrapper: unknown wrapper {prompt['wrapper']!r}; use one of {', '.join(WRAPPERS)}")
    for key in ("instruction", "input"):
        fill(prompt[key], f"prompt.{key}", **_DUMMY_FIELDS)
    if not prompt["yes"] or not prompt["no"] or prompt["yes"] == prompt["no"]:
        raise InputError(f"prompt.yes / prompt.no must be two different non-empty answers, got "
                         f"{prompt['yes']!r} / {prompt['no']!r}")
    samples = config["samples"]
    if samples["history_len"] < 1:
        raise InputError(f"samples.history_len must be >= 1, got {samples['history_len']}")
    for key in ("valid_size", "test_size"):
        if samples[key] < 0:
            raise InputError(f"samples.{key} must be >= 0 (0 = all), got {samples[key]}")
    split = samples["split"]
    if (len(split) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in split)
            or abs(sum(split) - 1) > 1e-6):
        raise InputError(f"samples.split must be three non-negative fractions summing to 1, got {split}")
    if config["model"]["batch_size"] < 1:
        raise InputError(f"model.batch_size must be >= 1, got {config['model']['batch_size']}")
    if not training:
        return
    lora = config["lora"]
    if lora["r"] < 1 or lora["alpha"] <= 0 or not 0 <= lora["dropout"] < 1:
        raise InputError(f"lora: need r >= 1, alpha > 0, 0 <= dropout < 1; got r={lora['r']}, "
                         f"alpha={lora['alpha']}, dropout={lora['dropout']}")
    if not lora["target_modules"] or not all(isinstance(t, str) for t in lora["target_modules"]):
        raise InputError(f"lora.target_modules must be a non-empty list of module names, got {lora['target_modules']}")
    train = config["train"]
    from recalign.llm.train import TrainConfig

    TrainConfig.from_config(train)
    if train["shots"] < 0:
        raise InputError(f"train.shots must be >= 0 (0 = all training samples), got {train['shots']}")
    if train["seeds"] < 1:
        raise InputError(f"train.seeds must be >= 1, got {train['seeds']}")
    if train["loss"] not in ("lm", "bce"):
        raise InputError(f"train.loss must be 'lm' or 'bce', got {train['loss']!r}")
