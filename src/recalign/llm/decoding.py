"""Decoding options for generative recommendation: plain beam search, D3 and sampling (`generate.decoding`).

Why: a small tuned LLM's beam search collapses onto a few popular titles (docs/benchmarks-bigrec.md). D3
("Decoding Matters", Bao et al. 2024) names two causes and fixes both at decoding time:
- *amplification bias*: length normalisation (sum of log-probs / length) rewards titles with many "ghost"
  tokens, tokens the model produces with probability ~1 (the year's "(19", a closing quote, the end token):
  they lengthen the sequence at no cost. D3 leaves them out of the length: a token whose probability under
  the model is above `ghost_threshold` is not counted, so score = sum of log-probs / #non-ghost tokens.
- *homogeneity*: a text-free assistant (a CF model's next-item scores) is added during beam search: its item
  distribution is mapped onto the candidate items' token paths (a trie of catalogue answer tokens), so a
  token's bonus is log P_cf(items below prefix + token) - log P_cf(items below prefix), times a weight.

What is here (the machinery; a method supplies the titles and the CF scores):
- `TitleTrie(paths)`: prefix tree over token paths (one per catalogue item, end token included);
  `next_tokens(prefix)`, `items(prefix)`.
- `TrieConstraint(trie, eos)`: a transformers `LogitsProcessor` that allows only catalogue continuations
  (a beam that left the trie may only end); works in transformers' beam search and in the loops here.
- `CFAssistant(trie, item_log_probs, weight, eos, group)`: the D3 assistant, a `LogitsProcessor` adding
  weight x the CF model's log-probability of each allowed next token (rows = prompts x group).
- `ghost_normalised(increments, model_log_probs, threshold)`: D3's score of one finished sequence.
- `beam_search(...)`: beam search with the ghost-aware length normalisation (threshold None = plain
  length normalisation; it then returns what `Backbone.generate`'s beam search returns, up to float noise).
- `sample(...)`: temperature / top-p sampling of several sequences per prompt, seeded by a private
  generator, merged by frequency (most frequent first; score = log of the share of samples).
- `DECODING_CONFIG` / `check_decoding`: the keys a method's `generate:` section adds.

`llm.generate_step(..., decoding=section, trie=..., assistant=...)` dispatches between these and the
backbone's own beam search (`beam`, unchanged). No dataset is read here: the method builds the trie from its
rendered answers and hands over per-prompt CF scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from recalign.errors import InputError

DECODINGS = ("beam", "d3", "sample")

# the keys every `generate:` section that uses `llm.generate_step` may carry (next to beams, max_new_tokens)
DECODING_CONFIG = {
    "decoding": "beam",  # beam: plain beam search | d3: ghost-aware length normalisation (+ assistant) | sample
    "constrained": False,  # only catalogue answers (a trie of their tokens); the assistant always uses the trie
    "ghost_threshold": 0.9,  # d3: tokens generated with probability above it are left out of the length
    "assistant": "none",  # d3: a CF model whose next-item scores are added during beam search ("none" = off)
    "assistant_weights": [0.0, 0.5, 1.0, 2.0],  # d3: the assistant's weight, chosen on the validation cases
    "samples": 8,  # sample: sequences drawn per prompt, merged by frequency
    "temperature": 1.0,  # sample
    "top_p": 0.9,  # sample: nucleus
}


def check_decoding(section: Mapping, where: str = "generate") -> None:
    """The decoding keys of a `generate:` section (one-line errors naming the key)."""
    name = section.get("decoding", "beam")
    if name not in DECODINGS:
        raise InputError(f"{where}.decoding: expected one of {', '.join(DECODINGS)}, got {name!r}")
    threshold = section.get("ghost_threshold", 0.9)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InputError(f"{where}.ghost_threshold: expected a number in (0, 1], got {threshold!r}")
    if not isinstance(section.get("constrained", False), bool):
        raise InputError(f"{where}.constrained: expected true or false, got {section.get('constrained')!r}")
    assistant = section.get("assistant", "none")
    if not isinstance(assistant, str) or not assistant:
        raise InputError(f"{where}.assistant: expected a CF model name or 'none', got {assistant!r}")
    if assistant != "none" and name != "d3":
        raise InputError(f"{where}.assistant: the assistant is part of decoding d3, not {name!r} "
                         f"(set {where}.decoding=d3 or {where}.assistant=none)")
    weights = section.get("assistant_weights", [0.0])
    if (not isinstance(weights, (list, tuple)) or not weights
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
                   for w in weights)):
        raise InputError(f"{where}.assistant_weights: expected a non-empty list of numbers >= 0, got {weights!r}")
    samples = section.get("samples", 8)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"{where}.samples: expected an integer >= 1, got {samples!r}")
    temperature = section.get("temperature", 1.0)
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature <= 0):
        raise InputError(f"{where}.temperature: expected a number > 0, got {temperature!r}")
    top_p = section.get("top_p", 0.9)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputError(f"{where}.top_p: expected a number in (0, 1], got {top_p!r}")


# ------------------------------------------------------------------------------------------------- trie
class TitleTrie:
    """Prefix tree over token paths, one path per item (its answer's tokens, the end token last).

    Items with the same path (a title listed twice) share its leaf. `next_tokens(prefix)`: the sorted
    tokens that continue `prefix` on some path (None when `prefix` is on no path); `items(prefix)`: the
    items whose path starts with `prefix`."""

    def __init__(self, paths: Sequence[Sequence[int]], items: Sequence[int] | None = None):
        items = list(range(len(paths))) if items is None else [int(i) for i in items]
        if len(items) != len(paths):
            raise InputError(f"title trie: {len(paths)} paths for {len(items)} items")
        children: list[dict[int, int]] = [{}]
        below: list[list[int]] = [[]]
        for item, path in zip(items, paths):
            if not len(path):
                raise InputError(f"title trie: item {item} has an empty token path")
            node = 0
            below[0].append(item)
            for token in path:
                token = int(token)
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = len(children)
                    children[node][token] = nxt
                    children.append({})
                    below.append([])
                node = nxt
                below[node].append(item)
        self._children = children
        self._items = [np.asarray(b, dtype=np.int64) for b in below]
        self._tokens = [np.asarray(sorted(c), dtype=np.int64) for c in children]
        self._lookup: dict[tuple[int, ...], int | None] = {(): 0}
        self._split: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.n_paths = len(paths)

    @classmethod
    def from_texts(cls, tokenize: Callable[[str], list[int]], texts: Sequence[str], eos_id: int,
                   items: Sequence[int] | None = None) -> "TitleTrie":
        """Paths = `tokenize(text)` (as answers are appended after a prompt: `Backbone.tokenize_piece`) + end."""
        return cls([list(tokenize(t)) + [int(eos_id)] for t in texts], items)

    def node(self, prefix: Sequence[int]) -> int | None:
        key = tuple(int(t) for t in prefix)
        if key in self._lookup:
            return self._lookup[key]
        parent = self.node(key[:-1])
        found = None if parent is None else self._children[parent].get(key[-1])
        if len(self._lookup) < 1_000_000:
            self._lookup[key] = found
        return found

    def next_tokens(self, prefix: Sequence[int]) -> np.ndarray | None:
        node = self.node(prefix)
        return None if node is None else self._tokens[node]

    def items(self, prefix: Sequence[int]) -> np.ndarray:
        node = self.node(prefix)
        return np.zeros(0, dtype=np.int64) if node is None else self._items[node]

    def split(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(items below `node`, for each the position of its child in `_tokens[node]`), cached."""
        if node not in self._split:
            tokens = self._tokens[node]
            items, positions = [], []
            for j, token in enumerate(tokens.tolist()):
                child_items = self._items[self._children[node][token]]
                items.append(child_items)
                positions.append(np.full(len(child_items), j, dtype=np.int64))
            self._split[node] = (np.concatenate(items) if items else np.zeros(0, np.int64),
                                 np.concatenate(positions) if positions else np.zeros(0, np.int64))
        return self._split[node]


class _Rows:
    """Tells a processor where generation starts: the prompt part of a `generate()` call's first input."""

    def __init__(self, pad_id: int | None):
        self.pad = pad_id
        self._prompt_len: int | None = None
        self._prompt_rows: torch.Tensor | None = None

    def generated(self, input_ids: torch.LongTensor) -> list[list[int]]:
        new_run = (self._prompt_rows is None or input_ids.shape[1] <= self._prompt_len
                   or input_ids.shape[0] != self._prompt_rows.shape[0]
                   or not torch.equal(input_ids[:, :self._prompt_len], self._prompt_rows))
        if new_run:
            self._prompt_len = input_ids.shape[1]
            self._prompt_rows = input_ids.clone()
        return input_ids[:, self._prompt_len:].tolist()


class TrieConstraint(LogitsProcessor):
    """Only continuations on the trie keep their score; a row off the trie may only end (EOS at 0)."""

    def __init__(self, trie: TitleTrie, eos_id: int):
        self.trie, self.eos = trie, int(eos_id)
        self._rows = _Rows(None)
        self.off_trie = 0  # rows that had left the trie (beam search fillers)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        for r, generated in enumerate(self._rows.generated(input_ids)):
            allowed = self.trie.next_tokens(generated)
            if allowed is None:
                self.off_trie += 1
                out[r, self.eos] = 0.0
                continue
            index = torch.as_tensor(allowed, device=scores.device)
            out[r, index] = scores[r, index]
        return out


class CFAssistant(LogitsProcessor):
    """D3's text-free assistant: adds weight x log P_cf(next token | prefix) to the allowed tokens, where
    P_cf(token | prefix) = P_cf(items below prefix + token) / P_cf(items below prefix) and P_cf is the
    softmax of a CF model's scores of the row's prompt. Row r belongs to prompt r // group.

    item_log_probs: [prompts, items] log-probabilities (masked items at -inf). Tokens off the trie are left
    alone (combine with `TrieConstraint`, which removes them); a prefix whose items all have probability 0
    gets no bonus."""

    def __init__(self, trie: TitleTrie, item_log_probs: torch.Tensor, weight: float, group: int):
        self.trie, self.weight, self.group = trie, float(weight), int(group)
        self.log_probs = torch.as_tensor(item_log_probs, dtype=torch.float64)
        self._rows = _Rows(None)

    def bonus(self, prompt: int, prefix: Sequence[int]) -> tuple[np.ndarray, torch.Tensor] | None:
        """(allowed tokens, log P_cf(token | prefix)) for one row, None when `prefix` is off the trie."""
        node = self.trie.node(prefix)
        if node is None:
            return None
        tokens = self.trie._tokens[node]
        if not len(tokens):  # a complete answer (e.g. a dead beam that ended): nothing follows
            return None
        items, positions = self.trie.split(node)
        lp = self.log_probs[prompt, torch.as_tensor(items)]
        top = lp.max()
        if not torch.isfinite(top):
            return tokens, torch.zeros(len(tokens), dtype=torch.float64)
        mass = torch.zeros(len(tokens), dtype=torch.float64).index_add_(0, torch.as_tensor(positions),
                                                                        (lp - top).exp())
        child = mass.log() + top
        return tokens, child - torch.logsumexp(lp, 0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.weight == 0:
            return scores
        scores = scores.clone()
        for r, generated in enumerate(self._rows.generated(input_ids)):
            found = self.bonus(r // self.group, generated)
            if found is None:
                continue
            tokens, bonus = found
            index = torch.as_tensor(tokens, device=scores.device)
            scores[r, index] = scores[r, index] + (self.weight * bonus).to(scores.dtype).to(scores.device)
        return scores


def ghost_normalised(increments: Sequence[float], model_log_probs: Sequence[float],
                     threshold: float | None) -> float:
    """D3's score of a finished sequence: the sum of its per-token scores (model log-prob, + the assistant's
    term) divided by the number of its tokens that are not ghosts, i.e. whose model probability is not above
    `threshold` (at least 1). threshold None: every token counts (plain length normalisation)."""
    total = float(sum(increments))
    if threshold is None:
        return total / max(1, len(increments))
    limit = math.log(threshold)
    counted = sum(1 for lp in model_log_probs if not lp > limit)
    return total / max(1, counted)


# ------------------------------------------------------------------------------------------ the loops
@dataclass
class Decoded:
    """texts[i][j] / token_ids[i][j]: the j-th sequence for prompt i (best first); scores[i, j] its score
    (beam search: the normalised score; sampling: log of its share of the samples). Same fields as
    `Backbone.generate`'s `Generation`, plus per-token model log-probs."""

    texts: list[list[str]]
    scores: torch.Tensor
    token_ids: list[list[list[int]]]
    token_log_probs: list[list[list[float]]]


Processors = Callable[[list[int], int], list]  # (prompt indices of the batch, rows per prompt) -> processors


def _forward(backbone, input_ids, attention_mask, position_ids, cache=None):
    kw = getattr(backbone, "_cache_kw", "past_key_values")
    extra = {kw: cache} if cache is not None else {}
    out = backbone.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **extra)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return out.logits[:, -1].float(), new_cache


def _batches(backbone, prompts: Sequence[str], batch_size: int | None) -> list[list[int]]:
    lengths = [backbone.count_tokens(p) for p in prompts]
    size = batch_size or backbone.batch_size
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    return [order[s:s + size] for s in range(0, len(order), size)]


def _apply(processors: list, sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(sequences, scores)
    return scores


def _strip(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


@torch.no_grad()
def beam_search(backbone, prompts: Sequence[str], beams: int, max_new_tokens: int,
                ghost_threshold: float | None = None, processors: Processors | None = None,
                batch_size: int | None = None) -> Decoded:
    """Beam search with D3's ghost-aware length normalisation: a finished sequence scores
    sum(per-token scores) / #tokens whose model probability is not above `ghost_threshold` (None: every
    token, i.e. `Backbone.generate`'s beam search with length_penalty 1). Otherwise transformers' beam
    search step for step: 2 x beams candidates by cumulative score, the first `beams` of them may finish,
    running beams ranked by cumulative score, the same early-stopping rule (with the ghost-aware length).
    Per-token scores are the processed log-probs (`processors(batch, beams)`: e.g. a trie constraint and
    the CF assistant); ghosts are judged on the model's own probability."""
    eos = backbone.tokenizer.eos_token_id
    limit = None if ghost_threshold is None else math.log(ghost_threshold)
    n, k = len(prompts), int(beams)
    texts: list = [None] * n
    token_ids: list = [None] * n
    token_lps: list = [None] * n
    scores = torch.zeros(n, k)
    with backbone.evaluating():
        for batch in _batches(backbone, prompts, batch_size):
            out = _beam_batch(backbone, [prompts[i] for i in batch], k, max_new_tokens, limit, eos,
                              processors(batch, k) if processors else [])
            for j, i in enumerate(batch):
                rows, lps, values = out[j]
                token_ids[i], token_lps[i] = rows, lps
                texts[i] = [backbone.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
                scores[i] = torch.tensor(values)
    return Decoded(texts, scores, token_ids, token_lps)


def _beam_batch(backbone, prompts, k, max_new, limit, eos, processors):
    enc = backbone.encode(prompts)
    b, width = enc.input_ids.shape
    dev = enc.input_ids.device
    logits, cache = _forward(backbone, enc.input_ids, enc.attention_mask, enc.position_ids)
    cache.batch_repeat_interleave(k)
    logits = logits.repeat_interleave(k, 0)
    mask = enc.attention_mask.repeat_interleave(k, 0)
    position = enc.position_ids[:, -1:].repeat_interleave(k, 0)
    sequences = enc.input_ids.repeat_interleave(k, 0)  # [b*k, width + t]
    lps = torch.zeros(b * k, 0, device=dev)  # model log-prob of every generated token, per running row
    counted = torch.zeros(b, k, device=dev)  # non-ghost tokens per running beam
    running = torch.full((b, k), float("-inf"), device=dev)
    running[:, 0] = 0.0
    finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(b)]
    open_ = torch.ones(b, dtype=torch.bool, device=dev)  # transformers' early-stop heuristic not yet met
    n_keep = 2 * k
    for t in range(max_new):
        model_lp = torch.log_softmax(logits, -1)  # [b*k, V]
        processed = _apply(processors, sequences, model_lp.clone())
        vocab = processed.shape[-1]
        total = (running.view(-1, 1) + processed).view(b, k * vocab)
        top_scores, top_index = torch.topk(total, n_keep, dim=1)
        beam = top_index // vocab
        token = top_index % vocab
        rows = beam + torch.arange(b, device=dev).unsqueeze(1) * k  # [b, 2k] flat running row
        token_lp = model_lp[rows, token]
        ghost = torch.zeros_like(token_lp, dtype=torch.bool) if limit is None else token_lp > limit
        new_counted = counted.gather(1, beam) + (~ghost).float()
        stops = (token == eos) if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        if t + 1 == max_new:
            stops = torch.ones_like(stops)
        alive = torch.isfinite(top_scores)
        # finished candidates: among the first k only, while the prompt can still improve
        for i in range(b):
            if not open_[i]:
                continue
            for c in range(k):
                if stops[i, c] and alive[i, c]:
                    row = int(rows[i, c])
                    seq = sequences[row, width:].tolist() + [int(token[i, c])]
                    seq_lp = lps[row].tolist() + [float(token_lp[i, c])]
                    score = float(top_scores[i, c]) / max(1.0, float(new_counted[i, c]))
                    finished[i].append((score, seq, seq_lp))
            finished[i].sort(key=lambda f: -f[0])  # stable: earlier (better cumulative) first on ties
            del finished[i][k:]
        # running beams: the best k candidates that did not stop
        keep_scores = torch.where(stops | ~alive, torch.full_like(top_scores, float("-inf")), top_scores)
        order = torch.topk(keep_scores, k, dim=1).indices
        running = keep_scores.gather(1, order)
        chosen_rows = rows.gather(1, order).view(-1)
        chosen_tokens = token.gather(1, order).view(-1, 1)
        sequences = torch.cat([sequences[chosen_rows], chosen_tokens], 1)
        lps = torch.cat([lps[chosen_rows], token_lp.gather(1, order).view(-1, 1)], 1)
        counted = new_counted.gather(1, order)
        # transformers' heuristic (early_stopping=False): stop a prompt once all k slots are finished and the
        # best running beam, normalised by its current length, cannot beat the worst finished one
        for i in range(b):
            if open_[i] and not bool(torch.isfinite(running[i]).any()):  # nothing left to continue (small trie)
                open_[i] = False
            if open_[i] and len(finished[i]) == k:
                best = float((running[i] / counted[i].clamp(min=1)).max()) if limit is not None else \
                    float(running[i, 0]) / (t + 1)
                if not best > finished[i][-1][0]:
                    open_[i] = False
        if t + 1 == max_new or not bool(open_.any()):
            break
        cache.reorder_cache(chosen_rows)
        mask = torch.cat([mask[chosen_rows], torch.ones(b * k, 1, dtype=mask.dtype, device=dev)], 1)
        position = position[chosen_rows] + 1
        logits, cache = _forward(backbone, chosen_tokens, mask, position, cache)
    out = []
    for i in range(b):
        done = finished[i] or [(-1e9, [], [])]  # nothing finished (every continuation masked): one empty answer
        while len(done) < k:  # fewer complete sequences than beams (a small trie): repeat the best, at -1e9
            score, seq, seq_lp = done[0]
            done.append((-1e9, seq, seq_lp))
        rows_, lps_, values = [], [], []
        for score, seq, seq_lp in done:
            stripped = _strip(seq, eos)
            rows_.append(stripped)
            lps_.append(seq_lp[:len(stripped)])
            values.append(score)
        out.append((rows_, lps_, values))
    return out


@torch.no_grad()
def sample(backbone, prompts: Sequence[str], returns: int, max_new_tokens: int, samples: int = 8,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, processors: Processors | None = None,
           batch_size: int | None = None) -> Decoded:
    """`samples` sequences per prompt (temperature, then nucleus `top_p`, after the processors), merged by
    frequency of their token sequences: the `returns` most frequent first (ties: higher mean model
    log-prob, then first drawn); score = log(count / samples). Fewer distinct sequences than `returns`:
    the last one is repeated at score -1e9. Seeded by a private generator (`seed`): the same prompts, batch
    size and seed give the same samples, whatever else uses torch's global generator."""
    eos = backbone.tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(int(seed))
    n, s = len(prompts), int(samples)
    texts: list = [None] * n
    token_ids: list = [None] * n
    token_lps: list = [None] * n
    scores = torch.zeros(n, returns)
    with backbone.evaluating():
        for batch in _batches(backbone, prompts, batch_size):
            drawn = _sample_batch(backbone, [prompts[i] for i in batch], s, max_new_tokens, temperature, top_p,
                                  eos, processors(batch, s) if processors else [], generator)
            for j, i in enumerate(batch):
                merged = _merge(drawn[j * s:(j + 1) * s], returns)
                token_ids[i] = [m[0] for m in merged]
                token_lps[i] = [m[1] for m in merged]
                texts[i] = [backbone.tokenizer.decode(m[0], skip_special_tokens=True) for m in merged]
                scores[i] = torch.tensor([m[2] for m in merged])
    return Decoded(texts, scores, token_ids, token_lps)


def _sample_batch(backbone, prompts, s, max_new, temperature, top_p, eos, processors, generator):
    enc = backbone.encode(prompts)
    b, width = enc.input_ids.shape
    dev = enc.input_ids.device
    logits, cache = _forward(backbone, enc.input_ids, enc.attention_mask, enc.position_ids)
    cache.batch_repeat_interleave(s)
    logits = logits.repeat_interleave(s, 0)
    mask = enc.attention_mask.repeat_interleave(s, 0)
    position = enc.position_ids[:, -1:].repeat_interleave(s, 0)
    sequences = enc.input_ids.repeat_interleave(s, 0)
    rows = b * s
    done = torch.zeros(rows, dtype=torch.bool)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    lps: list[list[float]] = [[] for _ in range(rows)]
    pad = backbone.pad_id
    for t in range(max_new):
        model_lp = torch.log_softmax(logits, -1)
        processed = _apply(processors, sequences, model_lp.clone())
        chosen = _draw(processed.float().cpu(), temperature, top_p, generator, eos if eos is not None else pad)
        chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
        chosen_lp = model_lp.cpu().gather(1, chosen.view(-1, 1)).view(-1)
        for r in range(rows):
            if not done[r]:
                tokens[r].append(int(chosen[r]))
                lps[r].append(float(chosen_lp[r]))
        done |= chosen == eos if eos is not None else torch.zeros_like(done)
        if t + 1 == max_new or bool(done.all()):
            break
        step = chosen.view(-1, 1).to(dev)
        sequences = torch.cat([sequences, step], 1)
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=dev)], 1)
        position = position + 1
        logits, cache = _forward(backbone, step, mask, position, cache)
    out = []
    for seq, seq_lp in zip(tokens, lps):
        stripped = _strip(seq, eos)
        out.append((stripped, seq_lp[:len(stripped)]))
    return out


def _draw(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
          fallback: int) -> torch.Tensor:
    """One token per row from softmax(scores / temperature) cut to its nucleus `top_p` (the most likely
    tokens whose mass before them is below top_p), by the Gumbel-max trick (exact; fast for a large
    vocabulary). A row with nothing allowed gets `fallback`."""
    logp = torch.log_softmax(scores / temperature, -1)
    if top_p < 1.0:
        k = min(logp.shape[-1], 512)
        values, index = logp.topk(k, -1)  # the nucleus usually lies in the top 512: no full sort
        short = values.exp().sum(-1) < top_p
        if short.any():
            values_all, index_all = logp[short].sort(-1, descending=True)
            full = torch.full((logp.shape[0], logp.shape[1]), float("-inf"))
            full[short] = values_all
            values_full = torch.cat([values, torch.full((logp.shape[0], logp.shape[1] - k), float("-inf"))], 1)
            values_full[short] = values_all
            index_full = torch.cat([index, torch.zeros(logp.shape[0], logp.shape[1] - k, dtype=torch.long)], 1)
            index_full[short] = index_all
            values, index = values_full, index_full
        p = values.exp()
        keep = (p.cumsum(-1) - p) < top_p
        logp = torch.full_like(logp, float("-inf")).scatter_(-1, index, torch.where(keep, values, float("-inf")))
    noise = torch.rand(logp.shape, generator=generator).clamp_(min=1e-20)
    chosen = (logp - (-noise.log()).log()).argmax(-1)
    bad = ~torch.isfinite(logp.max(-1).values)
    return torch.where(bad, torch.full_like(chosen, fallback), chosen)


def _merge(drawn: list[tuple[list[int], list[float]]], returns: int) -> list[tuple[list[int], list[float], float]]:
    groups: dict[tuple[int, ...], list] = {}
    for position, (seq, seq_lp) in enumerate(drawn):
        key = tuple(seq)
        mean = sum(seq_lp) / max(1, len(seq_lp))
        if key not in groups:
            groups[key] = [0, mean, position, seq, seq_lp]
        groups[key][0] += 1
    ranked = sorted(groups.values(), key=lambda g: (-g[0], -g[1], g[2]))[:returns]
    out = [(g[3], g[4], math.log(g[0] / len(drawn))) for g in ranked]
    while len(out) < returns:
        out.append((out[-1][0], out[-1][1], -1e9))
    return out


# ------------------------------------------------------------------------------------------- dispatch
def decode_block(backbone, prompts: Sequence[str], section: Mapping, beams: int, max_new_tokens: int,
                 batch_size: int | None = None, trie: TitleTrie | None = None,
                 assistant: torch.Tensor | None = None, weight: float = 0.0, seed: int = 0,
                 extra_processors: Sequence = ()) -> Decoded:
    """One block of prompts with the `d3` or `sample` decoding of a `generate:` section. `trie`: catalogue
    answers (required by `constrained` and by the assistant); `assistant`: [len(prompts), items] CF
    log-probabilities of these prompts, added with `weight` (d3)."""
    name = section.get("decoding", "beam")
    constrained = bool(section.get("constrained", False)) or (assistant is not None and weight > 0)
    if constrained and trie is None:
        raise InputError("generate.constrained / generate.assistant need the catalogue's title trie")
    eos = backbone.tokenizer.eos_token_id

    def processors(batch: list[int], group: int) -> list:
        out = list(extra_processors)
        if constrained:
            out.append(TrieConstraint(trie, eos))
        if assistant is not None and weight > 0:
            out.append(CFAssistant(trie, torch.as_tensor(assistant)[batch], weight, group))
        return out

    if name == "d3":
        return beam_search(backbone, prompts, beams, max_new_tokens, float(section.get("ghost_threshold", 0.9)),
                           processors, batch_size)
    if name == "sample":
        return sample(backbone, prompts, beams, max_new_tokens, int(section.get("samples", 8)),
                      float(section.get("temperature", 1.0)), float(section.get("top_p", 0.9)), seed, processors,
                      batch_size)
    raise InputError(f"generate.decoding: decode_block handles d3 and sample, not {name!r}")
