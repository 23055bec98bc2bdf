"""Served models: a finished run turned into something that scores items and recommends.

Three kinds:
- `CFServed` (every CF model): scores from `CFModel.score`, top-k from `cf.recommend` over the whole
  catalogue (the request's seen items masked);
- `YesNoServed` (TALLRec, ICL, CoLLM): logit(yes) - logit(no) of the run's own prompt per (history,
  item), through `Backbone.score_yes_no`; concurrent requests are micro-batched into one forward pass.
  Ranking the whole catalogue would cost one prompt per item, so `/recommend` re-ranks candidates: the
  request's own, else the `rerank` most popular unseen items;
- `GeneratorServed` (BIGRec): beam search generates a title from the history, the frozen base model
  embeds it, items are ranked by L2 distance to the catalogue embeddings (score = -distance).

Ids in requests are the dataset's raw ids (`Catalog`); the model sees dense ids.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from recalign.serve.batching import MicroBatcher


class Catalog:
    """The dataset as the server sees it: raw id <-> dense id for users and items, titles, every user's
    log (items in time order, liked flags) and item popularity (interactions in the whole log)."""

    def __init__(self, ds, key: tuple = ()):
        self.ds = ds
        self.key = key  # (dataset name, data config): two runs with the same key share one catalogue
        self.name = ds.name
        self.item_raw = [str(r) for r in ds.items["raw_id"]]
        self.user_raw = [str(r) for r in ds.users["raw_id"]]
        self.item_index = {raw: i for i, raw in enumerate(self.item_raw)}
        self.user_index = {raw: u for u, raw in enumerate(self.user_raw)}
        self.titles = ds.titles()
        inter = ds.interactions
        users = inter["user"].to_numpy(np.int64)
        self._items = inter["item"].to_numpy(np.int64)
        self._labels = inter["label"].to_numpy(bool)
        self._starts = np.searchsorted(users, np.arange(ds.n_users + 1), side="left")
        self.popularity = np.bincount(self._items, minlength=ds.n_items)
        self.popular_order = np.argsort(-self.popularity, kind="stable")

    def difference(self, other: "Catalog") -> str:
        """What makes two catalogues differ, in words: the datasets, or the data: keys whose values differ."""
        if self.key[:1] != other.key[:1]:
            return f"datasets {self.key[0] if self.key else self.name!r} vs {other.key[0] if other.key else other.name!r}"
        mine, theirs = (json.loads(c.key[1]) if len(c.key) > 1 else {} for c in (self, other))
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return ", ".join(f"data.{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in keys) or "other data"

    @property
    def n_items(self) -> int:
        return len(self.item_raw)

    @property
    def n_users(self) -> int:
        return len(self.user_raw)

    def user_log(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, liked) of the user's interactions, oldest first."""
        lo, hi = self._starts[user], self._starts[user + 1]
        return self._items[lo:hi], self._labels[lo:hi]


@dataclass
class Context:
    """A resolved request: the user (-1 when none was given), the history the model reads (oldest first)
    with liked flags, and the items a recommendation must not repeat (`seen`)."""

    user: int
    history: np.ndarray
    liked: np.ndarray
    seen: np.ndarray


@dataclass
class Ranked:
    items: np.ndarray  # dense ids, best first
    scores: np.ndarray
    candidates: str  # where the ranked items came from: catalogue | request | popular-N
    generated: str | None = None  # a generator's text


class ServedModel:
    kind = ""  # cf | yesno | generator
    role = ""  # cf | llm (the router's two sides)
    needs_user = False  # scores only users it was trained on (a history alone says nothing to it)

    def __init__(self, name: str, path: Path, method: str, dataset: str, config: dict, metrics: dict,
                 catalog: Catalog, info: dict | None = None):
        self.name, self.path, self.method, self.dataset = name, Path(path), method, dataset
        self.config, self.metrics, self.catalog = config, metrics, catalog
        self.info = dict(info or {})
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"serve-{name}")
        self.train_user_counts: np.ndarray | None = None  # set for CF runs (the router's warm/cold rule)
        self.train_item_counts: np.ndarray | None = None

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path), "method": self.method, "dataset": self.dataset,
                "kind": self.kind, "role": self.role, "users": self.catalog.n_users, "items": self.catalog.n_items,
                **self.info, "metrics": self.metrics}

    async def _call(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def score(self, ctx: Context, items: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    async def recommend(self, ctx: Context, k: int, exclude_seen: bool, candidates: np.ndarray | None) -> Ranked:
        raise NotImplementedError

    async def close(self) -> None:
        """Called when the app stops (after in-flight requests were answered); the model stays usable."""


def _top(items: np.ndarray, scores: np.ndarray, k: int, seen: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The k best (items, scores), seen items dropped, ties kept in input order."""
    if seen is not None and len(seen):
        keep = ~np.isin(items, seen)
        items, scores = items[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:k]
    return items[order], scores[order]


# ------------------------------------------------------------------------------------------------ CF
def scores_known_users_only(model) -> bool:
    """A non-sequential model with a learnt vector per training user (MF, LightGCN) reads the user id only: an
    unknown user is the zero vector whatever the history. FISM, kNN, Pop and sequential models read the history."""
    from recalign.cf.base import CFModel

    return not model.sequential and type(model).user_embeddings is not CFModel.user_embeddings


class CFServed(ServedModel):
    kind, role = "cf", "cf"

    def __init__(self, *args, model, **kwargs):
        super().__init__(*args, **kwargs)
        self.model = model.eval()
        self.needs_user = self.info["needs_user"] = scores_known_users_only(model)

    def query(self, ctx: Context):
        from recalign.cf import make_query

        return make_query([ctx.user], [ctx.history], self.model.n_items, self.model.max_len)

    def score_sync(self, ctx: Context, items: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            scores = self.model.score(self.query(ctx), torch.as_tensor(np.asarray(items, np.int64)))
        return scores.float()[0].numpy()

    def recommend_sync(self, ctx: Context, k: int, exclude_seen: bool, candidates: np.ndarray | None) -> Ranked:
        from recalign.cf import recommend

        if candidates is not None:
            items, scores = _top(candidates, self.score_sync(ctx, candidates), k, ctx.seen if exclude_seen else None)
            return Ranked(items, scores, "request")
        scores, items = recommend(self.model, self.query(ctx), k, exclude_history=exclude_seen,
                                  full_histories=[ctx.seen])
        scores, items = scores[0].numpy(), items[0].numpy()
        finite = np.isfinite(scores)  # fewer unseen items than k: the masked ones (-inf) are not answers
        return Ranked(items[finite], scores[finite], "catalogue")

    async def score(self, ctx: Context, items: np.ndarray) -> np.ndarray:
        return await self._call(self.score_sync, ctx, items)

    async def recommend(self, ctx: Context, k: int, exclude_seen: bool, candidates: np.ndarray | None) -> Ranked:
        return await self._call(self.recommend_sync, ctx, k, exclude_seen, candidates)


# ----------------------------------------------------------------------------------------- LLM kinds
class _Batched(ServedModel):
    """An LLM model behind a MicroBatcher (rows -> one result per row)."""

    def __init__(self, *args, backbone, max_batch: int = 32, max_wait_ms: float = 5.0, rerank: int = 50, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone = backbone
        self.max_batch = int(max_batch)
        self.rerank = int(rerank)
        # the app sets batcher.on_batch (metrics)
        self.batcher = MicroBatcher(self.run_rows, max_batch, max_wait_ms, self.name, executor=self.executor)
        self.info.update({"precision": backbone.precision, "max_batch": self.max_batch,
                          "max_wait_ms": float(max_wait_ms)})

    def run_rows(self, rows: list) -> list:
        raise NotImplementedError

    def candidates(self, ctx: Context, exclude_seen: bool) -> np.ndarray:
        """The `rerank` most popular items (unseen ones when exclude_seen)."""
        order = self.catalog.popular_order
        if exclude_seen and len(ctx.seen):
            order = order[~np.isin(order, ctx.seen)]
        return order[:self.rerank]

    async def close(self) -> None:
        await self.batcher.close()


class YesNoServed(_Batched):
    """TALLRec / ICL / CoLLM: one prompt per (history, item), score = logit(yes) - logit(no).

    render(rows) -> (prompts, slots or None) is the run's own prompt (built in `loading`); a row is
    (user, history tuple, liked tuple, item) with the history already cut to what the method reads."""

    kind, role = "yesno", "llm"

    def __init__(self, *args, render: Callable, yes: str, no: str, history_len: int, liked_only: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.render, self.yes, self.no = render, yes, no
        self.history_len, self.liked_only = int(history_len), bool(liked_only)

    def rows(self, ctx: Context, items: np.ndarray) -> list[tuple]:
        history, liked = ctx.history, ctx.liked
        if self.liked_only:  # CoLLM: the last L liked items
            history, liked = history[liked], liked[liked]
        history, liked = history[-self.history_len:], liked[-self.history_len:]
        h, f = tuple(int(i) for i in history), tuple(bool(x) for x in liked)
        return [(int(ctx.user), h, f, int(item)) for item in items]

    def run_rows(self, rows: list) -> list:
        prompts, slots = self.render(rows)
        scores = self.backbone.score_yes_no(prompts, self.yes, self.no, slots=slots, batch_size=self.max_batch)
        return scores.numpy().tolist()

    async def score(self, ctx: Context, items: np.ndarray) -> np.ndarray:
        return np.asarray(await self.batcher.submit(self.rows(ctx, items)), dtype=np.float32)

    async def recommend(self, ctx: Context, k: int, exclude_seen: bool, candidates: np.ndarray | None) -> Ranked:
        source = "request" if candidates is not None else f"popular-{self.rerank}"
        pool = candidates if candidates is not None else self.candidates(ctx, exclude_seen)
        scores = await self.score(ctx, pool)
        items, scores = _top(pool, scores, k, ctx.seen if exclude_seen else None)
        return Ranked(items, scores, source)


class GeneratorServed(_Batched):
    """BIGRec: generate(history) -> ground: score of item i = -L2(embedding of the text, embedding of i).

    generate(histories) -> (distances [B, n_items], generated texts) is built in `loading`."""

    kind, role = "generator", "llm"

    def __init__(self, *args, generate: Callable, history_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.generate, self.history_len = generate, int(history_len)

    def run_rows(self, rows: list) -> list:
        distances, texts = self.generate(rows)
        return [(distances[i], texts[i]) for i in range(len(rows))]

    async def _ground(self, ctx: Context) -> tuple[np.ndarray, str]:
        history = tuple(int(i) for i in ctx.history[-self.history_len:])
        (distances, text), = await self.batcher.submit([history])
        return -np.asarray(distances, dtype=np.float32), text

    async def score(self, ctx: Context, items: np.ndarray) -> np.ndarray:
        scores, _ = await self._ground(ctx)
        return scores[items]

    async def recommend(self, ctx: Context, k: int, exclude_seen: bool, candidates: np.ndarray | None) -> Ranked:
        scores, text = await self._ground(ctx)
        pool = candidates if candidates is not None else np.arange(self.catalog.n_items)
        items, top = _top(pool, scores[pool], k, ctx.seen if exclude_seen else None)
        return Ranked(items, top, "request" if candidates is not None else "catalogue", generated=text)
