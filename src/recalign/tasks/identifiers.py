"""Items named in several facets (TransRec's multi-facet identifiers), as text.

- `facet_texts(ds, use, markers)` -> {facet: per item, its identifier texts}, in the reference's notation:
  ID ` || 12 ##` (the dataset's raw item id between the ID markers), attribute one per category
  ` ## Comedy @@`, title ` Toy Story (1995)` (the display title, whitespace collapsed). Every text starts
  with a space, so the tokens of a text are the same alone and inside a longer text. An item without the
  facet's text (no title, no categories) is an InputError naming the item.
- `history_texts(ds)` -> {facet: per item, how it is written in a prompt's history}: its raw id, its
  display title, its categories joined by ", ".
- `facet_answers(texts, targets, use, title_span_words, eos, seed)` -> {facet: per target, the trained
  answer}: the ID, one of the categories (seeded draw), or a span of the title from a random start word
  (`title_span`, `span_starts`), followed by `eos` when the answer is a whole identifier.
- `title_start_words(texts)`: the words a title span may start with (what generation may start with).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from recalign.errors import InputError

FACETS = ("id", "title", "attribute")
# a title span does not start at one of these words (the reference's banned span starts, abridged)
SPAN_STOPWORDS = frozenset({"the", "a", "an", "and", "or", "of", "to", "in", "on", "for", "with", "at", "by"})
YEAR = re.compile(r"\(\d{4}\)")


def categories_of(value) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [" ".join(str(c).split()) for c in value if str(c).strip()]


def _item_columns(ds) -> tuple[list[str], list[str], list[list[str]]]:
    raw_ids = [str(r) for r in ds.items["raw_id"]]
    titles = [" ".join(str(t).split()) for t in ds.titles()]
    categories = ([categories_of(c) for c in ds.items["categories"]] if "categories" in ds.items
                  else [[] for _ in raw_ids])
    return raw_ids, titles, categories


def facet_texts(ds, use: Sequence[str], markers: Mapping[str, Sequence[str]]) -> dict[str, list[list[str]]]:
    unknown = [f for f in use if f not in FACETS]
    if unknown:
        raise InputError(f"facets: unknown facet {unknown[0]!r}; known: {', '.join(FACETS)}")
    raw_ids, titles, categories = _item_columns(ds)
    _check_markers(use, markers, raw_ids, titles, categories)
    out: dict[str, list[list[str]]] = {}
    if "id" in use:
        out["id"] = [[f" {markers['id'][0]} {r} {markers['id'][1]}"] for r in raw_ids]
    if "attribute" in use:
        out["attribute"] = [[f" {markers['attribute'][0]} {c} {markers['attribute'][1]}" for c in cats]
                            for cats in categories]
    if "title" in use:
        out["title"] = [[f" {t}"] if t else [] for t in titles]
    for facet, per_item in out.items():
        for item, texts in enumerate(per_item):
            if not texts:
                what = "title" if facet == "title" else "categories"
                raise InputError(f"item {raw_ids[item]!r} has no {what} (facet {facet}); drop the item or remove "
                                 f"'{facet}' from facets.use")
    return out


def _check_markers(use, markers, raw_ids, titles, categories) -> None:
    """An id, category or title holding a facet marker would end (or fake) an identifier early: every
    generated identifier would then name no item or the wrong one. One line naming the item."""
    used = {m for facet in ("id", "attribute") if facet in use for m in markers[facet] if m}
    per_item = {"id": ("id", [[r] for r in raw_ids]), "attribute": ("category", categories),
                "title": ("title", [[t] for t in titles])}
    for facet, (what, texts) in per_item.items():
        if facet not in use:
            continue
        for item, text in ((i, t) for i, item_texts in enumerate(texts) for t in item_texts):
            hit = next((m for m in used if m in text), None)
            if hit:
                raise InputError(f"item {raw_ids[item]!r}: its {what} {text[:60]!r} holds the facet marker {hit!r}; "
                                 "choose other facets.markers")


def history_texts(ds) -> dict[str, list[str]]:
    raw_ids, titles, categories = _item_columns(ds)
    return {"id": raw_ids, "title": titles, "attribute": [", ".join(c) for c in categories]}


def span_starts(words: Sequence[str]) -> list[int]:
    """Where a title span may start: any word but a stopword or a display title's "(1995)" year (a span of
    the year alone names hundreds of items, and a model tuned on such spans learns to answer with the year)."""
    return [i for i, w in enumerate(words) if w.casefold() not in SPAN_STOPWORDS and not YEAR.fullmatch(w)] or [0]


def title_start_words(texts: Mapping[str, list[list[str]]]) -> list[str]:
    """Every word a title span of some item may start with (sorted)."""
    words = set()
    for (title,) in texts["title"]:
        split = title.split()
        words.update(split[i] for i in span_starts(split))
    return sorted(words)


def title_span(words: list[str], max_words: int, rng: np.random.Generator) -> tuple[str, bool]:
    """(" w_i ... w_j", whether the span reaches the end of the title): a span of up to `max_words` words from
    a random start word (`span_starts`). `max_words` 0: the whole title."""
    if max_words <= 0:
        return " " + " ".join(words), True
    starts = span_starts(words)
    start = int(starts[rng.integers(len(starts))])
    end = min(len(words), start + max_words)
    return " " + " ".join(words[start:end]), end == len(words)


def facet_answers(texts: Mapping[str, list[list[str]]], targets: Sequence[int], use: Sequence[str],
                  title_span_words: int, eos: str, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {f: [] for f in use}
    for target in targets:
        for facet in use:
            if facet == "id":
                out[facet].append(texts["id"][target][0] + eos)
            elif facet == "attribute":
                options = texts["attribute"][target]
                out[facet].append(options[int(rng.integers(len(options)))] + eos)
            else:
                span, whole = title_span(texts["title"][target][0].split(), int(title_span_words), rng)
                out[facet].append(span + (eos if whole else ""))
    return out
