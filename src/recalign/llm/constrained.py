"""Position-free constrained beam search over a token index (TransRec), as a transformers `LogitsProcessor`.

`IndexConstraint(index, eos_id, FacetRule(start, stops))` lets a beam continue only with tokens that follow its
generated tokens somewhere in the corpus (`eval.token_index.TokenIndex.next_tokens`), so generation may begin at
any position of any identifier (no prefix trie) and every generated sequence occurs in the corpus:
- `start`: tokens every generation begins with (e.g. an identifier's opening marker); forced, at no cost;
- `stops`: token sequences that complete an identifier (its closing marker): once the generation past
  `start` ends with one, only EOS is allowed, at no cost;
- EOS is allowed where the corpus allows the end token (a document ends there) and never as the first token;
- a beam with no allowed continuation (a dead end, or a beam search filler whose tokens are not in the
  corpus) is ended: every logit -inf but EOS. Without that, a beam whose row is all -inf would let an
  arbitrary (unconstrained) token through.
The processor records the model's log-probability of every allowed token at every step it sees (transformers
hands processors log-softmax scores in beam search), so `token_log_probs` gives each returned beam's per-token
log-probabilities: every prefix of a beam is a scored n-gram (TransRec's keys) without a second forward pass.

`IdentifierCorpus(texts, tokenizer, markers, names)`: multi-facet identifier texts as tokens, the items'
documents for the index and each facet's `FacetRule`.

`constrained_generate_step(store, backbone, prompts, name, index, rule, beams, max_new_tokens)`: beam search for
every prompt under a fresh `IndexConstraint` per block, checkpointed as `generations-NAME` (token ids,
per-token log-probabilities, beam scores), so a rerun continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from recalign.errors import InputError
from recalign.eval.token_index import TokenIndex

_FORCED = "forced"
_NOTHING = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class FacetRule:
    """How generations of one facet start and end (token ids of the backbone's tokenizer). `first`: when
    given, the words (as token sequences) a generation without `start` must begin with, e.g. the words a
    title span can start at; past a whole first word the generation is free again. Empty: any corpus token."""

    start: tuple[int, ...] = ()
    stops: tuple[tuple[int, ...], ...] = ()
    first: tuple[tuple[int, ...], ...] = ()

    def complete(self, tokens: Sequence[int]) -> bool:
        """True when `tokens` (a generation) is a whole identifier: past `start`, it ends with a stop (rules
        without stops: every generation is complete)."""
        body = tuple(tokens[len(self.start):])
        if tuple(tokens[:len(self.start)]) != self.start:
            return False
        if not self.stops:
            return len(body) > 0
        return any(len(body) >= len(s) and body[len(body) - len(s):] == s for s in self.stops)


class IndexConstraint(LogitsProcessor):
    def __init__(self, index: TokenIndex, eos_id: int, rule: FacetRule = FacetRule(), pad_id: int | None = None):
        self.index, self.eos, self.rule = index, int(eos_id), rule
        self.pad = self.eos if pad_id is None else int(pad_id)
        self.records: dict[tuple[tuple[int, ...], tuple[int, ...]], object] = {}
        self._prompt_len: int | None = None
        self._prompt_rows: torch.Tensor | None = None
        self._row_keys: list[tuple[int, ...]] = []
        self.dead_ends = 0  # beams ended because nothing could follow
        self._first_children: dict[tuple[int, ...], np.ndarray] | None = None
        if rule.first and not rule.start:
            children: dict[tuple[int, ...], set] = {}
            for word in rule.first:
                for k in range(len(word)):
                    children.setdefault(tuple(word[:k]), set()).add(word[k])
            self._first_children = {k: np.asarray(sorted(v), dtype=np.int64) for k, v in children.items()}
            self._first_words = set(rule.first)

    def _within_first_word(self, generated: tuple[int, ...]) -> np.ndarray | None:
        """The tokens that may come next while the first word is not complete; None once it is."""
        if any(generated[:k] in self._first_words for k in range(1, len(generated) + 1)):
            return None
        return self._first_children.get(generated, _NOTHING)

    def prompt_key(self, prompt_ids: Sequence[int]) -> tuple[int, ...]:
        """The key of a prompt's records: its token ids without left padding."""
        ids = list(prompt_ids)
        i = 0
        while i < len(ids) and ids[i] == self.pad:
            i += 1
        return tuple(ids[i:])

    def _new_run(self, input_ids: torch.LongTensor) -> bool:
        if self._prompt_rows is None or input_ids.shape[1] <= self._prompt_len:
            return True
        prompt = input_ids[:, :self._prompt_len]
        return prompt.shape != self._prompt_rows.shape or not torch.equal(prompt, self._prompt_rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.tolist()
        if self._new_run(input_ids):  # the first step of a generate() call
            self._prompt_len = input_ids.shape[1]
            self._prompt_rows = input_ids.clone()
            self._row_keys = [self.prompt_key(row) for row in rows]  # beams never change their prompt's row
        out = torch.full_like(scores, float("-inf"))
        start, n_start = self.rule.start, len(self.rule.start)
        for r, row in enumerate(rows):
            generated = tuple(row[self._prompt_len:])
            key = (self._row_keys[r], generated)
            if generated[:n_start] != start[:len(generated)]:  # not this facet's opening marker
                self._end(out, r)
                continue
            if len(generated) < n_start:
                out[r, start[len(generated)]] = 0.0
                self.records[key] = _FORCED
                continue
            if len(generated) > n_start and self.rule.stops and self.rule.complete(generated):
                out[r, self.eos] = 0.0
                self.records[key] = _FORCED
                continue
            tokens, _ = self.index.next_tokens(generated)
            if not generated and len(tokens):
                tokens = tokens[tokens != self.eos]
            if self._first_children is not None and len(tokens):
                within = self._within_first_word(generated)
                if within is not None:
                    tokens = tokens[np.isin(tokens, within)]
            if not len(tokens):
                self.dead_ends += 1
                self._end(out, r)
                continue
            allowed = torch.as_tensor(tokens, device=scores.device)
            values = scores[r, allowed]
            out[r, allowed] = values
            if key not in self.records:
                self.records[key] = (np.asarray(tokens), values.float().cpu().numpy())
        return out

    def _end(self, out: torch.Tensor, r: int) -> None:
        out[r, self.eos] = 0.0

    def token_log_probs(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> list[float] | None:
        """Log-probability of each generated token as the model gave it (0 for forced tokens); None when a
        step was not recorded (the sequence was not produced under this constraint)."""
        pk = self.prompt_key(prompt_ids)
        out = []
        for t, token in enumerate(generated):
            record = self.records.get((pk, tuple(generated[:t])))
            if record is None:
                return None
            if record is _FORCED:
                out.append(0.0)
                continue
            tokens, values = record
            i = int(np.searchsorted(tokens, token))
            if i == len(tokens) or tokens[i] != token:
                return None
            out.append(float(values[i]))
        return out


class IdentifierCorpus:
    """Identifier texts (`tasks.identifiers.facet_texts`: {facet: per item, its texts}) as token ids, each
    item's document and each facet's `FacetRule`.

    Texts are tokenised in one batched tokenizer call per facet (no special tokens). The ID and attribute
    facets start at their opening marker and end after their closing marker (`markers[facet]`); the title
    facet starts anywhere (position-free; with `title_starts`, with one of those words, wherever it occurs)
    and ends where a document ends. An item's document is its identifiers in the order ID, attributes, title;
    as in the reference, an identifier that opens with the closing marker of the one before shares it
    (` || 12 ## Comedy @@ ## Drama @@ Title`), so an opening marker is always followed by its own facet's
    text. `names` (the items' ids) name the item in errors."""

    ORDER = ("id", "attribute", "title")

    def __init__(self, texts: dict[str, list[list[str]]], tokenizer, markers: dict[str, Sequence[str]],
                 names: Sequence[str], title_starts: Sequence[str] = ()):
        self.texts = texts
        self.use = [f for f in self.ORDER if f in texts]
        eos = tokenizer.eos_token_id
        self.tokens: dict[str, list[list[list[int]]]] = {}
        for facet, per_item in texts.items():
            flat = [t for item_texts in per_item for t in item_texts]
            encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
            rows = []
            for item, item_texts in enumerate(per_item):
                ids = [list(next(encoded)) for _ in item_texts]
                for text, t in zip(item_texts, ids):
                    if not t:
                        raise InputError(f"item {names[item]!r}: its {facet} identifier {text!r} tokenises to nothing")
                    if eos is not None and eos in t:
                        raise InputError(f"item {names[item]!r}: its {facet} identifier {text!r} contains the "
                                         f"tokenizer's end-of-sequence token")
                rows.append(ids)
            self.tokens[facet] = rows
        starts = (tokenizer([f" {w}" for w in title_starts], add_special_tokens=False)["input_ids"]
                  if title_starts else [])
        self.rules = {"title": FacetRule(first=tuple(sorted({tuple(ids) for ids in starts if ids})))}
        for facet in ("id", "attribute"):
            if facet not in texts:
                continue
            piece = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
            rule = FacetRule(piece(f" {markers[facet][0]}"), (piece(f" {markers[facet][1]}"),))
            for item, ids in enumerate(self.tokens[facet]):
                if not all(rule.complete(t) for t in ids):
                    raise InputError(f"facets.markers.{facet}: the markers {list(markers[facet])} tokenise "
                                     f"differently inside item {names[item]!r}'s identifier; pick markers that "
                                     f"stay separate tokens")
            self.rules[facet] = rule
        n_items = len(next(iter(texts.values()))) if texts else 0
        self.docs = [self._document(item) for item in range(n_items)]

    def _document(self, item: int) -> list[int]:
        doc: list[int] = []
        close: tuple[int, ...] = ()
        for facet in self.use:
            rule = self.rules[facet]
            for ids in self.tokens[facet][item]:
                if close and rule.start == close and tuple(doc[len(doc) - len(close):]) == close:
                    ids = ids[len(close):]
                doc += ids
                close = rule.stops[0] if rule.stops else ()
        return doc


def constrained_generate_step(store, backbone, prompts: list[str], name: str, index: TokenIndex, rule: FacetRule,
                              beams: int, max_new_tokens: int, block: int = 8,
                              progress: str | None = None) -> dict:
    """Constrained beam search for every prompt -> {"tokens": [[beam token ids]], "log_probs": [[per-token
    log-probs]], "scores": [[beam scores]]}, best beam first, beams that are not real generations (scores at
    -inf or near the -1e9 of beam search's filler beams, unrecorded steps) dropped. Checkpointed as
    `generations-NAME` every `block` prompts. Beam scores are sums of log-probabilities (length_penalty 0)."""
    from recalign.progress import track

    state = store.load_checkpoint(f"generations-{name}") or {"tokens": [], "log_probs": [], "scores": []}
    if len(state["tokens"]) > len(prompts):
        raise InputError(f"checkpoint generations-{name} holds more cases than this run has; use a new --out")
    starts = range(len(state["tokens"]), len(prompts), block)
    for first in track(starts, progress or f"generating {name} ({beams} beams, constrained)"):
        eos = backbone.tokenizer.eos_token_id
        if eos is None:
            raise InputError("constrained generation needs a tokenizer with an end-of-sequence token")
        batch = prompts[first:first + block]
        constraint = IndexConstraint(index, eos, rule, pad_id=backbone.pad_id)
        out = backbone.generate(batch, num_beams=beams, max_new_tokens=max_new_tokens, batch_size=len(batch),
                                logits_processor=constraint, length_penalty=0.0)
        for i, prompt in enumerate(batch):
            prompt_ids = backbone.tokenize(prompt)
            kept_tokens, kept_lp, kept_scores = [], [], []
            for tokens, score in zip(out.token_ids[i], out.scores[i].tolist()):
                if not np.isfinite(score) or score < -1e8:
                    continue
                log_probs = constraint.token_log_probs(prompt_ids, tokens)
                if log_probs is None:
                    continue
                kept_tokens.append([int(t) for t in tokens])
                kept_lp.append(log_probs)
                kept_scores.append(float(score))
            state["tokens"].append(kept_tokens)
            state["log_probs"].append(kept_lp)
            state["scores"].append(kept_scores)
        store.save_checkpoint(f"generations-{name}", state)
    return state


def keys_of(tokens: Sequence[Sequence[int]], log_probs: Sequence[Sequence[float]], rule: FacetRule,
            prefixes: bool, make: Callable[[tuple[int, ...], float], object]) -> list:
    """The scored n-grams of one prompt's beams: every non-empty prefix past `rule.start` (`prefixes`, the
    position-free facets) or the complete identifiers only, each with the sum of its tokens' log-probs."""
    out = []
    for seq, lps in zip(tokens, log_probs):
        if prefixes:
            total = 0.0
            for t in range(len(seq)):
                total += lps[t]
                if t + 1 > len(rule.start):
                    out.append(make(tuple(seq[:t + 1]), total))
        elif rule.complete(seq):
            out.append(make(tuple(seq), float(sum(lps))))
    return out
