"""Task samples as words: the fields a prompt template may use. The LLM layer renders templates; it never
reads datasets, so a method turns its task's samples into fields here and hands them to `llm.Prompter`."""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd

from recalign.errors import InputError


def check_titles_free_of(ds, placeholders: dict[str, str]) -> None:
    """A title that holds a slot placeholder ({placeholder: its config key}) would be read as that slot: one
    line naming the item, before anything is trained."""
    for index, title in enumerate(ds.titles()):
        for token, key in placeholders.items():
            if token and token in title:
                raise InputError(f"{ds.name}: item {ds.items['raw_id'].iloc[index]!r} has the title {title[:80]!r}, "
                                 f"which holds the placeholder {token}; choose another {key} (or rename the item)")


def quote_titles(titles: Sequence[str], quote: str = '"', sep: str = ", ") -> str:
    return sep.join(f"{quote}{t}{quote}" for t in titles)


def text_fields(history: Sequence[int], labels: Sequence[bool] | None, target: int | None, titles: Sequence[str],
                noun: str, quote_target: bool = True, empty_history: str = "") -> dict:
    """Fields for one sample: {liked}, {disliked} (quoted titles of the liked / disliked history items, oldest
    first; `empty_history` when there are none), {history} (all history titles), {target} (the target's
    title, quoted unless `quote_target` is off), {noun}, {nouns}, {n_liked}, {n_disliked}, {n_history}."""
    labels = [True] * len(history) if labels is None else labels
    liked = [titles[i] for i, f in zip(history, labels) if f]
    disliked = [titles[i] for i, f in zip(history, labels) if not f]
    fields = {"liked": quote_titles(liked) if liked else empty_history,
              "disliked": quote_titles(disliked) if disliked else empty_history,
              "history": quote_titles([titles[i] for i in history]),
              "noun": noun, "nouns": f"{noun}s", "n_liked": len(liked), "n_disliked": len(disliked),
              "n_history": len(history)}
    if target is not None:
        fields["target"] = f'"{titles[target]}"' if quote_target else titles[target]
    return fields


SAMPLE_FIELDS = text_fields(history=(0, 1), labels=(True, False), target=2, titles=["a", "b", "c"], noun="movie")
HISTORY_FIELDS = ("history", "liked", "disliked")  # a generative prompt must use one: it is all the model sees


def frame_fields(frame: pd.DataFrame, titles: Sequence[str], noun: str, with_target: bool = True,
                 with_labels: bool = True, **options) -> list[tuple[Callable[[int], dict], int]]:
    """Per sample row: (fields(k) for the k most recent history items, history length) — what
    `llm.Prompter.render_all` takes, so that long prompts can drop their oldest history items."""
    out = []
    label_column = frame["history_labels"] if with_labels and "history_labels" in frame else [None] * len(frame)
    targets = frame["item"] if with_target else [None] * len(frame)
    for history, labels, target in zip(frame["history"], label_column, targets):
        def fields(k: int, history=history, labels=labels, target=target) -> dict:
            recent = history[len(history) - k:] if k else ()
            recent_labels = None if labels is None else (labels[len(labels) - k:] if k else ())
            return text_fields(recent, recent_labels, None if target is None else int(target), titles, noun,
                               **options)

        out.append((fields, len(history)))
    return out
