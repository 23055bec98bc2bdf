"""Constrained and prompt-cached beam search: a prefix trie over identifier token sequences (P5), the
LogitsProcessor that keeps transformers' generation on it, and a beam search that runs each prompt once.

`IdTrie(sequences)`: one token sequence per item (the identifier as the model is trained to answer it, the
end token included), e.g. item 7 -> tokens of "1234<eos>". `allowed(prefix)` gives the tokens that continue a
prefix towards some identifier; `item(sequence)` the item a complete sequence spells (None otherwise).
Sequences must be unique and none may be a proper prefix of another (the end token guarantees that).

`TrieConstraint(trie, eos_id, pad_id, banned=...)`: a transformers `LogitsProcessor` for (beam) search: at
every step a beam may only take a token the trie allows after its generated tokens, so every finished beam
is a catalogue identifier. `banned` maps a prompt (its token ids without left padding) to items its beams
may not end in (e.g. the user's history, which the evaluator masks anyway): a token is refused when every
identifier it leads to is banned, so beams are not spent on them. A beam with no allowed token (a dead
end, or a beam search filler that took a -inf token) is ended with the end token at a score of -1e9, so it
sinks below every real beam; `decode_beams` drops such beams. The prompt part of the rows is recognised per
generate() call: the first call of a run sees the prompt only, so its width is the prompt's width.

`cached_beam_search(backbone, prompts, beams, max_new_tokens, trie=None, ...)`: beam search that runs each
prompt once and gathers its KV cache rows for the live beams (transformers copies the prompt `beams` times
before its first forward pass: most of the work for short answers on a CPU); free text, or on a trie.
`trie_beam_search` returns (items, log P) per prompt; `trie_generate_step` / `cached_generate_step` run them
over many prompts, checkpointed in a store like `llm.generate_step`. On the tests' examples they return
exactly transformers' beams and scores (free text; trie with enough beams), and with the trie's scores
equal to the LM loss's log-probabilities.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from transformers import LogitsProcessor

from recalign.errors import InputError

DEAD_END = -1e9


class IdTrie:
    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.children: dict[tuple[int, ...], set[int]] = {}
        self.items: dict[tuple[int, ...], int] = {}
        self.under: dict[tuple[int, ...], list[int]] = {}  # prefix -> the items whose tokens start with it
        self.max_len = 0
        for item, seq in enumerate(sequences):
            seq = tuple(int(t) for t in seq)
            if not seq:
                raise InputError(f"identifier trie: item {item} has an empty token sequence")
            if seq in self.items:
                raise InputError(f"identifier trie: items {self.items[seq]} and {item} have the same identifier "
                                 f"tokens {list(seq)}")
            self.items[seq] = item
            self.max_len = max(self.max_len, len(seq))
            for t in range(len(seq)):
                self.children.setdefault(seq[:t], set()).add(seq[t])
            for t in range(1, len(seq) + 1):
                self.under.setdefault(seq[:t], []).append(item)
        for seq, item in self.items.items():
            if seq in self.children:
                raise InputError(f"identifier trie: item {item}'s tokens {list(seq)} are a prefix of another "
                                 f"identifier (end every identifier with the end token)")
        self._sorted = {prefix: sorted(tokens) for prefix, tokens in self.children.items()}

    def __len__(self) -> int:
        return len(self.items)

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that continue `prefix` towards an identifier (sorted; empty past a complete one)."""
        return self._sorted.get(tuple(prefix), [])

    def item(self, sequence: Sequence[int]) -> int | None:
        return self.items.get(tuple(int(t) for t in sequence))


class TrieConstraint(LogitsProcessor):
    def __init__(self, trie: IdTrie, eos_id: int, pad_id: int | None = None,
                 banned: Mapping[tuple[int, ...], Iterable[int]] | None = None):
        self.trie, self.eos = trie, int(eos_id)
        self.pad = self.eos if pad_id is None else int(pad_id)
        self.banned = {tuple(k): frozenset(int(i) for i in v) for k, v in (banned or {}).items()}
        self._prompt_len: int | None = None
        self._prompt_rows: torch.Tensor | None = None
        self._row_bans: list[frozenset] = []
        self._cache: dict[tuple[frozenset, tuple[int, ...]], list[int]] = {}
        self.dead_ends = 0

    def prompt_key(self, row: Sequence[int]) -> tuple[int, ...]:
        ids = list(row)
        i = 0
        while i < len(ids) and ids[i] == self.pad:
            i += 1
        return tuple(ids[i:])

    def _new_run(self, input_ids: torch.LongTensor) -> bool:
        if self._prompt_rows is None or input_ids.shape[1] <= self._prompt_len:
            return True
        prompt = input_ids[:, :self._prompt_len]
        return prompt.shape != self._prompt_rows.shape or not torch.equal(prompt, self._prompt_rows)

    def allowed(self, generated: tuple[int, ...], bans: frozenset) -> list[int]:
        """Tokens allowed after `generated` when the items `bans` may not be finished."""
        key = (bans, generated)
        found = self._cache.get(key)
        if found is None:
            found = [t for t in self.trie.allowed(generated)
                     if not bans or any(i not in bans for i in self.trie.under[generated + (t,)])]
            if len(self._cache) < 1_000_000:
                self._cache[key] = found
        return found

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.tolist()
        if self._new_run(input_ids):
            self._prompt_len = input_ids.shape[1]
            self._prompt_rows = input_ids.clone()
            empty = frozenset()
            self._row_bans = [self.banned.get(self.prompt_key(row), empty) for row in rows]
        out = torch.full_like(scores, float("-inf"))
        for r, row in enumerate(rows):
            tokens = self.allowed(tuple(row[self._prompt_len:]), self._row_bans[r])
            if not tokens:
                self.dead_ends += 1
                out[r, self.eos] = DEAD_END  # ended, far below any real beam
                continue
            index = torch.as_tensor(tokens, device=scores.device)
            out[r, index] = scores[r, index]
        return out


def decode_beams(trie: IdTrie, token_ids: Sequence[Sequence[int]], scores: Sequence[float],
                 eos_id: int) -> tuple[list[int], list[float]]:
    """(items, scores) of one prompt's returned beams (token ids without the end token, as
    `Backbone.generate` strips it) that spell a whole identifier, best first, each item once; beams that do
    not (dead ends, fillers at -inf or -1e9) are dropped."""
    items, kept = [], []
    seen = set()
    for tokens, score in zip(token_ids, scores):
        if score != score or score <= DEAD_END / 10:
            continue
        item = trie.item(list(tokens) + [eos_id])
        if item is None or item in seen:
            continue
        seen.add(item)
        items.append(item)
        kept.append(float(score))
    order = sorted(range(len(items)), key=lambda i: -kept[i])
    return [items[i] for i in order], [kept[i] for i in order]


@torch.no_grad()
def cached_beam_search(backbone, prompts: Sequence[str], beams: int, max_new_tokens: int, trie: IdTrie | None = None,
                       banned: Mapping[tuple[int, ...], Iterable[int]] | None = None, length_penalty: float = 0.0,
                       batch_size: int | None = None) -> list[list[tuple[tuple[int, ...], float]]]:
    """Beam search with each prompt run once: per prompt, the best `beams` generations as (token ids without
    the end token, score), best first. score = the sum of the model's token log-probabilities (the end token
    included) / generated length ** `length_penalty` (transformers' beam score; 0 = log P of the sequence).

    transformers copies every prompt `beams` times before its first forward pass, so a prompt is run `beams`
    times; here it is run once and its KV cache rows are gathered for the live beams, one token per beam per
    step. Each step keeps the `beams` best unfinished prefixes of each prompt (by summed log-probability);
    every sequence that ends (the end token) on the way is a candidate (transformers keeps only those among a
    step's top `beams` candidates, so these lists are never worse). With a `trie`, only its continuations are
    allowed (`TrieConstraint.allowed`, `banned` per prompt) and the search stops once no unfinished prefix can
    beat the `beams`-th finished one (exact for length_penalty 0: log-probabilities only decrease); without,
    it stops at `max_new_tokens` (unfinished beams then count as they are) or when the best unfinished
    prefix, scored as if it ended now, is below the `beams`-th finished one (transformers' rule)."""
    eos = backbone.tokenizer.eos_token_id
    helper = TrieConstraint(trie, eos, backbone.pad_id, banned) if trie is not None else None
    ids = [backbone.tokenize(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    size = batch_size or backbone.batch_size
    results: list = [None] * len(prompts)
    model, device = backbone.model, backbone.device
    steps = trie.max_len if trie is not None else int(max_new_tokens)

    def final(tokens: tuple[int, ...], total: float, ended: bool) -> float:
        length = len(tokens) + (1 if ended else 0)
        return total / (max(1, length) ** length_penalty) if length_penalty else total

    with backbone.evaluating():
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            bans = [helper.banned.get(tuple(ids[i]), frozenset()) for i in batch] if helper else None
            enc = backbone.encode([prompts[i] for i in batch])
            out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                        position_ids=enc.position_ids, use_cache=True, logits_to_keep=1)
            cache, mask, pos = _cache_of(out), enc.attention_mask, enc.position_ids[:, -1]
            logp = out.logits[:, -1].float().log_softmax(-1).cpu()
            live = [[((), 0.0, b)] for b in range(len(batch))]  # (tokens, summed log-prob, row of logp/cache)
            finished: list[list[tuple[float, tuple[int, ...]]]] = [[] for _ in batch]
            for step in range(steps):
                parents, tokens_in, next_live = [], [], [[] for _ in batch]
                for b in range(len(batch)):
                    candidates = []
                    for tokens, total, row in live[b]:
                        if helper is not None:
                            allowed = helper.allowed(tokens, bans[b])
                            values = logp[row, allowed].tolist() if allowed else []
                        else:
                            top = logp[row].topk(beams + 1)
                            allowed, values = top.indices.tolist(), top.values.tolist()
                        for t, v in zip(allowed, values):
                            if t == eos:
                                finished[b].append((final(tokens, total + v, True), tokens))
                            else:
                                candidates.append((total + v, tokens + (t,), row))
                    finished[b] = sorted(finished[b], key=lambda f: -f[0])[:beams]
                    if len(finished[b]) >= beams:
                        floor = finished[b][-1][0]
                        exact = helper is not None and not length_penalty
                        candidates = [c for c in candidates
                                      if (c[0] if exact else final(c[1], c[0], False)) > floor]
                    candidates.sort(key=lambda c: -c[0])
                    for total, tokens, row in candidates[:beams]:
                        next_live[b].append((tokens, total, len(parents)))
                        parents.append(row)
                        tokens_in.append(tokens[-1])
                live = next_live
                if not parents or step == steps - 1:
                    break
                index = torch.tensor(parents, device=device)
                cache.reorder_cache(index)
                mask = torch.cat([mask[index], torch.ones(len(parents), 1, dtype=mask.dtype, device=device)], dim=1)
                pos = pos[index] + 1
                out = model(input_ids=torch.tensor(tokens_in, device=device).unsqueeze(1), attention_mask=mask,
                            position_ids=pos.unsqueeze(1), use_cache=True, **{backbone._cache_kw: cache})
                cache = _cache_of(out)
                logp = out.logits[:, -1].float().log_softmax(-1).cpu()
            for b, i in enumerate(batch):
                done = list(finished[b])
                if helper is None:  # max_new_tokens reached: unfinished beams count as they are
                    done += [(final(tokens, total, False), tokens) for tokens, total, _ in live[b]]
                done.sort(key=lambda f: -f[0])
                results[i] = [(tokens, score) for score, tokens in done[:beams]]
    return results


def trie_beam_search(backbone, prompts: Sequence[str], trie: IdTrie, beams: int,
                     banned: Mapping[tuple[int, ...], Iterable[int]] | None = None,
                     batch_size: int | None = None, length_penalty: float = 0.0) -> list[tuple[list[int], list[float]]]:
    """`cached_beam_search` under the trie: per prompt, (items, scores) of the best `beams` identifiers found,
    best first, score = log P(identifier tokens | prompt) (length_penalty 0); identifiers `banned` for a
    prompt are never finished."""
    eos = backbone.tokenizer.eos_token_id
    out = []
    for found in cached_beam_search(backbone, prompts, beams, trie.max_len, trie, banned, length_penalty,
                                    batch_size):
        out.append(([trie.item(tokens + (eos,)) for tokens, _ in found], [score for _, score in found]))
    return out


def cached_generate_step(store, backbone, prompts: list[str], name: str, beams: int, max_new_tokens: int,
                         batch_size: int | None = None, length_penalty: float = 1.0, block: int = 32) -> dict:
    """`cached_beam_search` (free text) for every prompt -> {"texts": [[beam texts]], "scores": [[beam
    scores]]}, best first: `llm.generate_step`'s output, checkpointed the same way as `generations-NAME`."""
    from recalign.progress import track

    state = store.load_checkpoint(f"generations-{name}") or {"texts": [], "scores": []}
    if "texts" not in state or len(state["texts"]) > len(prompts):
        raise InputError(f"checkpoint generations-{name} does not belong to this run; use a new --out")
    starts = range(len(state["texts"]), len(prompts), block)
    for start in track(starts, f"generating {name} ({beams} beams, prompt cached)"):
        for found in cached_beam_search(backbone, prompts[start:start + block], beams, max_new_tokens, None, None,
                                        length_penalty, batch_size):
            state["texts"].append([backbone.tokenizer.decode(list(t), skip_special_tokens=True) for t, _ in found])
            state["scores"].append([float(sc) for _, sc in found])
        store.save_checkpoint(f"generations-{name}", state)
    return state


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def trie_generate_step(store, backbone, prompts: list[str], name: str, trie: IdTrie, beams: int,
                       banned: Mapping[tuple[int, ...], Iterable[int]] | None = None, batch_size: int | None = None,
                       length_penalty: float = 0.0, block: int = 32) -> dict:
    """`trie_beam_search` for every prompt -> {"items": [[item per beam]], "scores": [[log P]]}, best first,
    checkpointed as `generations-NAME` every `block` prompts (a rerun continues where it stopped)."""
    from recalign.progress import track

    state = store.load_checkpoint(f"generations-{name}") or {"items": [], "scores": []}
    if "items" not in state or len(state["items"]) > len(prompts):
        raise InputError(f"checkpoint generations-{name} does not belong to this run; use a new --out")
    starts = range(len(state["items"]), len(prompts), block)
    for start in track(starts, f"generating {name} ({beams} beams, trie)"):
        for items, scores in trie_beam_search(backbone, prompts[start:start + block], trie, beams, banned, batch_size,
                                              length_penalty):
            state["items"].append([int(i) for i in items])
            state["scores"].append([float(s) for s in scores])
        store.save_checkpoint(f"generations-{name}", state)
    return state
