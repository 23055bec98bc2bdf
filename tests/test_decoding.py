"""Decoding options (llm.decoding): plain beam unchanged, D3's ghost-aware length normalisation ranked by
hand on a scripted 3-item catalogue whose titles share tokens, the title trie, the CF assistant, seeded
sampling, bad input, and BIGRec end to end with d3 + assistant on a tiny random Llama."""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from transformers import LogitsProcessor

from recalign.errors import InputError
from recalign.llm import Backbone, Generation, Wrapper, generate_step
from recalign.llm import decoding as dec
from recalign.llm.backbone import Encoded
from recalign.runner import run_method
from recalign.runs import RunDir


# ----------------------------------------------------------------------------------- a scripted LM
# vocabulary: 0 pad, 1 end, 2..6 words, 7 the prompt. Catalogue answers (paths, end token included):
#   X = [2, 3, 4, 5, 1]   "A B C D": after "A B" the model is sure (0.99) of "C", "D" and the end: 3 ghosts
#   Y = [2, 6, 1]         "A E": shares "A" with X
#   Z = [4, 1]            "C"
NAMES = ["<pad>", "<end>", "A", "B", "C", "D", "E", "<p>"]
PATHS = [[2, 3, 4, 5, 1], [2, 6, 1], [4, 1]]
TABLE = {(): {2: 0.5, 4: 0.3}, (2,): {3: 0.5, 6: 0.5}, (2, 3): {4: 0.99}, (2, 3, 4): {5: 0.99},
         (2, 3, 4, 5): {1: 0.99}, (2, 6): {1: 0.6}, (4,): {1: 0.5}}
V = len(NAMES)


def _probs(prefix: tuple) -> torch.Tensor:
    given = TABLE.get(prefix, {})
    rest = [t for t in range(V) if t not in given]
    left = 1.0 - sum(given.values())
    p = torch.full((V,), max(left, 1e-6) / len(rest), dtype=torch.float64)
    for token, value in given.items():
        p[token] = value
    return p / p.sum()


class _SeqCache:
    def __init__(self, ids):
        self.ids = ids

    def batch_repeat_interleave(self, k):
        self.ids = self.ids.repeat_interleave(k, 0)

    def reorder_cache(self, index):
        self.ids = self.ids[index]


class _ScriptedLM(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=1,
                past_key_values=None):
        seq = input_ids if past_key_values is None else torch.cat([past_key_values.ids, input_ids], 1)
        logits = torch.stack([_probs(tuple(row[1:])).log() for row in seq.tolist()]).float()
        return SimpleNamespace(logits=logits.unsqueeze(1), past_key_values=_SeqCache(seq))


class Scripted:
    """Just what `llm.decoding`'s loops use of a Backbone."""

    batch_size, pad_id = 8, 0

    def __init__(self):
        self.model = _ScriptedLM()
        self.tokenizer = SimpleNamespace(eos_token_id=1, decode=lambda ids, skip_special_tokens=True: " ".join(
            NAMES[i] for i in ids))

    def count_tokens(self, prompt):
        return 1

    def encode(self, prompts):
        n = len(prompts)
        return Encoded(torch.full((n, 1), 7), torch.ones(n, 1, dtype=torch.long), torch.zeros(n, 1, dtype=torch.long),
                       torch.zeros(n))

    @contextmanager
    def evaluating(self):
        with torch.no_grad():
            yield


def _by_hand(path, threshold, cf=None, weight=0.0):
    """(sum of log-probs [+ weight x CF log P(token | prefix)], count of non-ghost tokens)."""
    total, counted = 0.0, 0
    for t, token in enumerate(path):
        p = float(_probs(tuple(path[:t]))[token])
        total += math.log(p)
        if cf is not None:
            below = lambda prefix: sum(cf[i] for i, q in enumerate(PATHS) if q[:len(prefix)] == list(prefix))
            total += weight * math.log(below(path[:t + 1]) / below(path[:t]))
        counted += threshold is None or not p > threshold
    return total / max(1, counted)


def _trie_processors(trie, cf=None, weight=0.0):
    def make(batch, group):
        out = [dec.TrieConstraint(trie, 1)]
        if cf is not None:
            out.append(dec.CFAssistant(trie, torch.tensor([cf] * len(batch)).log(), weight, group))
        return out
    return make


def test_ghost_normalised_score_of_hand_made_log_probs():
    lps = [math.log(0.5), math.log(0.5), math.log(0.99), math.log(0.99), math.log(0.99)]
    assert dec.ghost_normalised(lps, lps, None) == pytest.approx(sum(lps) / 5)
    assert dec.ghost_normalised(lps, lps, 0.9) == pytest.approx(sum(lps) / 2)  # the three 0.99 tokens left out
    assert dec.ghost_normalised(lps, lps, 0.995) == pytest.approx(sum(lps) / 5)
    assert dec.ghost_normalised(lps, lps, 1.0) == pytest.approx(sum(lps) / 5)  # nothing is above 1
    # increments may hold more than the model's log-probs (the assistant); ghosts are judged on the model's
    assert dec.ghost_normalised([-1.0, -2.0], [math.log(0.95), math.log(0.2)], 0.9) == pytest.approx(-3.0)
    assert dec.ghost_normalised([math.log(0.999)], [math.log(0.999)], 0.9) == pytest.approx(math.log(0.999))


def test_ghost_normalisation_ranks_the_three_item_catalogue_as_by_hand():
    trie = dec.TitleTrie(PATHS)
    by_text = {" ".join(NAMES[t] for t in p[:-1]): i for i, p in enumerate(PATHS)}
    for threshold, order in ((None, [0, 1, 2]), (0.9, [1, 0, 2])):
        out = dec.beam_search(Scripted(), ["p"], beams=3, max_new_tokens=6, ghost_threshold=threshold,
                              processors=_trie_processors(trie))
        assert [by_text[t] for t in out.texts[0]] == order
        expected = [_by_hand(PATHS[i], threshold) for i in order]
        assert out.scores[0].tolist() == pytest.approx(expected, abs=1e-5)
        # per-token model log-probs come back too (the end token stripped)
        assert out.token_log_probs[0][order.index(0)] == pytest.approx(
            [math.log(p) for p in (0.5, 0.5, 0.99, 0.99)], abs=1e-5)
    # plain normalisation favours the long title of ghost tokens (X: -1.42 / 5); D3 puts the short Y first
    assert _by_hand(PATHS[0], None) > _by_hand(PATHS[1], None)
    assert _by_hand(PATHS[1], 0.9) > _by_hand(PATHS[0], 0.9)


def test_assistant_scores_and_weight_zero_on_the_scripted_catalogue():
    trie = dec.TitleTrie(PATHS)
    cf = [0.1, 0.1, 0.8]
    helper = dec.CFAssistant(trie, torch.tensor([cf]).log(), 1.0, 1)
    tokens, bonus = helper.bonus(0, [])
    assert tokens.tolist() == [2, 4] and bonus.tolist() == pytest.approx([math.log(0.2), math.log(0.8)])
    tokens, bonus = helper.bonus(0, [2])
    assert tokens.tolist() == [3, 6] and bonus.tolist() == pytest.approx([math.log(0.5), math.log(0.5)])
    assert helper.bonus(0, [5]) is None  # off the trie: nothing to add
    assert helper.bonus(0, [4, 1]) is None  # a complete answer (a dead beam's row): nothing follows
    rows = torch.tensor([[7, 4, 1], [7, 2, 6]])  # two beams of one prompt
    beams = dec.CFAssistant(trie, torch.tensor([cf]).log(), 1.0, 2)
    beams._rows.generated(rows[:, :1])  # the prompt is one token
    scored = beams(rows, torch.zeros(2, V))
    assert torch.equal(scored[0], torch.zeros(V)) and scored[1, 1] == pytest.approx(0.0)
    plain = dec.beam_search(Scripted(), ["p"], 3, 6, 0.9, _trie_processors(trie))
    zero = dec.beam_search(Scripted(), ["p"], 3, 6, 0.9, _trie_processors(trie, cf, 0.0))
    assert zero.texts == plain.texts and torch.equal(zero.scores, plain.scores)
    strong = dec.beam_search(Scripted(), ["p"], 3, 6, 0.9, _trie_processors(trie, cf, 2.0))
    assert strong.texts[0][0] == "C"  # the CF model's item first
    scores = {t: s for t, s in zip(strong.texts[0], strong.scores[0].tolist())}
    for i, text in enumerate(["A B C D", "A E", "C"]):
        assert scores[text] == pytest.approx(_by_hand(PATHS[i], 0.9, cf, 2.0), abs=1e-5)


def test_trie_allows_only_catalogue_continuations():
    trie = dec.TitleTrie(PATHS + [[2, 6, 1]])  # a title listed twice shares its leaf
    assert trie.next_tokens([]).tolist() == [2, 4]
    assert trie.next_tokens([2]).tolist() == [3, 6]
    assert trie.next_tokens([2, 3, 4, 5]).tolist() == [1]
    assert trie.next_tokens([3]) is None and trie.next_tokens([2, 3, 4, 5, 1]).tolist() == []
    assert trie.items([2]).tolist() == [0, 1, 3] and trie.items([2, 6, 1]).tolist() == [1, 3]
    constraint = dec.TrieConstraint(trie, eos_id=1)
    prompt = torch.tensor([[7, 7], [7, 7]])
    first = constraint(prompt, torch.zeros(2, V))
    assert torch.isfinite(first).nonzero()[:, 1].tolist() == [2, 4, 2, 4]
    later = constraint(torch.tensor([[7, 7, 2], [7, 7, 5]]), torch.zeros(2, V))
    assert torch.isfinite(later[0]).nonzero().view(-1).tolist() == [3, 6]
    assert torch.isfinite(later[1]).nonzero().view(-1).tolist() == [1]  # off the trie: may only end
    with pytest.raises(InputError, match="empty token path"):
        dec.TitleTrie([[]])


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    torch.manual_seed(0)
    return Backbone.load("tiny-random", batch_size=4)


def _prompts(tiny, n=6):
    wrap = Wrapper("chat", system="", tokenizer=tiny.tokenizer)
    titles = ["Star Wars (1977)", "Heat (1995)", "Fargo (1996)"]
    return [wrap("Recommend a movie.", "Watched: " + ", ".join(titles[:1 + i % 3]) + f" ({i})") for i in range(n)]


class _EndSometimes(LogitsProcessor):
    """Makes the end token likely after some tokens, so beams finish at different lengths."""

    def __init__(self):
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        if self.prompt_len is None or input_ids.shape[1] <= self.prompt_len:
            self.prompt_len = input_ids.shape[1]
        scores = scores.clone()
        if input_ids.shape[1] > self.prompt_len:
            scores[input_ids[:, -1] % 3 == 0, 2] += 6.0
        return scores


def test_d3_loop_without_ghosts_is_transformers_beam_search(tiny):
    prompts = _prompts(tiny)
    for beams, max_new, processor in ((2, 6, None), (4, 9, _EndSometimes), (3, 12, _EndSometimes)):
        ref = tiny.generate(prompts, num_beams=beams, max_new_tokens=max_new, batch_size=len(prompts),
                            logits_processor=processor() if processor else None)
        mine = dec.beam_search(tiny, prompts, beams, max_new, None, batch_size=len(prompts),
                               processors=(lambda b, g: [processor()]) if processor else None)
        assert mine.token_ids == ref.token_ids
        assert torch.allclose(mine.scores, ref.scores, atol=1e-4)


class _Recording:
    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.tokenizer = inner.tokenizer

    def generate(self, prompts, **kwargs):
        self.calls.append(sorted(kwargs))
        return self.inner.generate(prompts, **kwargs)


def test_beam_decoding_is_todays_beam_search(tiny, tmp_path):
    prompts = _prompts(tiny, 5)
    runs = {}
    for label, options in (("none", None), ("beam", dict(dec.DECODING_CONFIG))):
        backbone = _Recording(tiny)
        runs[label] = (generate_step(RunDir(tmp_path / label, resume=True), backbone, prompts, "t", 2, 5, 0, block=2,
                                     decoding=options), backbone.calls)
    assert runs["none"] == runs["beam"]  # same generations, same backbone calls (no new keyword reaches it)
    assert runs["beam"][1][0] == ["batch_size", "max_new_tokens", "num_beams"]
    direct = [tiny.generate(prompts[s:s + 2], num_beams=2, max_new_tokens=5) for s in range(0, 5, 2)]
    assert runs["beam"][0]["texts"] == [row for d in direct for row in d.texts]
    assert runs["beam"][0]["scores"] == [row for d in direct for row in d.scores.tolist()]


def _tiny_trie(tiny):
    titles = ['"Star Wars (1977)"', '"Star Trek (1979)"', '"Heat (1995)"', '"Fargo (1996)"']
    return titles, dec.TitleTrie.from_texts(tiny.tokenize_piece, titles, tiny.tokenizer.eos_token_id)


def test_constrained_generation_returns_catalogue_answers_only(tiny, tmp_path):
    titles, trie = _tiny_trie(tiny)
    prompts = _prompts(tiny, 3)
    for mode in ("beam", "d3", "sample"):
        options = {**dec.DECODING_CONFIG, "decoding": mode, "constrained": True, "samples": 6}
        out = generate_step(RunDir(tmp_path / mode, resume=True), tiny, prompts, "t", 3, 24, decoding=options,
                            trie=trie)
        for row in out["texts"]:
            assert set(row) <= set(titles), (mode, row)
        if mode != "sample":
            assert all(len(set(row)) == 3 for row in out["texts"])  # three different catalogue answers
    with pytest.raises(InputError, match="trie"):
        generate_step(RunDir(tmp_path / "x", resume=True), tiny, prompts, "t", 2, 4,
                      decoding={**dec.DECODING_CONFIG, "constrained": True})


def test_assistant_weight_zero_equals_plain_d3_on_tiny(tiny, tmp_path):
    titles, trie = _tiny_trie(tiny)
    prompts = _prompts(tiny, 4)
    options = {**dec.DECODING_CONFIG, "decoding": "d3", "constrained": True}
    cf = torch.log_softmax(torch.randn(len(prompts), len(titles), dtype=torch.float64), -1)
    plain = generate_step(RunDir(tmp_path / "a", resume=True), tiny, prompts, "t", 3, 24, decoding=options, trie=trie)
    zero = generate_step(RunDir(tmp_path / "b", resume=True), tiny, prompts, "t", 3, 24, decoding=options, trie=trie,
                         assistant=cf, assistant_weight=0.0)
    assert zero == plain
    # a dominant assistant: the top answer is each prompt's CF favourite
    strong = generate_step(RunDir(tmp_path / "c", resume=True), tiny, prompts, "t", 3, 24, decoding=options,
                           trie=trie, assistant=cf, assistant_weight=50.0)
    assert [row[0] for row in strong["texts"]] == [titles[int(i)] for i in cf.argmax(1)]


def test_sampling_is_seeded_reproducible_and_merged_by_frequency(tiny, tmp_path):
    prompts = _prompts(tiny, 5)
    options = {**dec.DECODING_CONFIG, "decoding": "sample", "samples": 5, "temperature": 1.5, "top_p": 0.95}

    def go(where, seed, block=32):
        return generate_step(RunDir(tmp_path / where, resume=True), tiny, prompts, "s", 3, 4, block=block,
                             decoding=options, seed=seed)

    torch.manual_seed(123)
    first = go("a", 0, block=2)
    torch.manual_seed(456)  # the global generator does not matter
    assert go("b", 0, block=2) == first
    assert go("c", 1, block=2) != first
    # resume mid-way: the remaining blocks are drawn as in an uninterrupted run
    run = RunDir(tmp_path / "d", resume=True)
    run.save_checkpoint("generations-s", {"texts": first["texts"][:2], "scores": first["scores"][:2]})
    assert go("d", 0, block=2) == first
    for row in first["scores"]:
        assert row == sorted(row, reverse=True) and row[0] <= 0.0
    # merging by hand: the most frequent sequence first, ties by mean log-prob, missing ranks repeat the last
    merged = dec._merge([([5], [-1.0]), ([6], [-0.5]), ([5], [-1.0]), ([7], [-0.1])], 4)
    assert [m[0] for m in merged] == [[5], [7], [6], [6]]
    assert [m[2] for m in merged][:3] == pytest.approx([math.log(0.5), math.log(0.25), math.log(0.25)])
    assert merged[3][2] == -1e9


def test_scripted_sampling_follows_the_model():
    trie = dec.TitleTrie(PATHS)
    out = dec.sample(Scripted(), ["p"], 3, 6, samples=400, temperature=1.0, top_p=1.0, seed=0,
                     processors=_trie_processors(trie))
    shares = {t: math.exp(s) for t, s in zip(out.texts[0], out.scores[0].tolist())}
    # constrained, the model's probabilities renormalised at every trie node among the allowed tokens:
    # P(X) = 5/8 * 1/2, P(Y) = 5/8 * 1/2, P(Z) = 3/8 (single continuations are certain)
    for text, p in {"A B C D": 5 / 16, "A E": 5 / 16, "C": 3 / 8}.items():
        assert shares[text] == pytest.approx(p, abs=0.08)


def test_bad_decoding_options_are_one_line_errors(tmp_path):
    ok = dict(dec.DECODING_CONFIG)
    dec.check_decoding(ok)
    for key, value, match in (("decoding", "greedy", "generate.decoding"), ("ghost_threshold", 0, "ghost_threshold"),
                              ("ghost_threshold", 1.5, "ghost_threshold"), ("samples", 0, "generate.samples"),
                              ("top_p", 0.0, "top_p"), ("temperature", 0, "temperature"),
                              ("assistant_weights", [], "assistant_weights"), ("assistant", "sasrec", "d3")):
        with pytest.raises(InputError, match=match):
            dec.check_decoding({**ok, key: value})
    dec.check_decoding({**ok, "ghost_threshold": 1.0})
    with pytest.raises(InputError, match="generate.assistant"):
        run_method("bigrec", "ml-100k", tmp_path / "r", sets=["generate.decoding=d3", "generate.assistant=tallrec"])
    with pytest.raises(InputError, match="generate.decoding"):
        run_method("bigrec", "ml-100k", tmp_path / "r", sets=["generate.decoding=nucleus"])
    assert not (tmp_path / "r").exists()


TINY = ["model.name=tiny-random", "train.shots=8", "train.epochs=1", "train.valid_loss_size=4",
        "samples.valid_size=6", "samples.test_size=8", "generate.beams=2", "generate.max_new_tokens=64",
        "inject.cf_model=mf", "inject.cf_train.epochs=1", "inject.gammas=[0.0, 1.0]"]


def test_bigrec_d3_with_assistant_end_to_end(tmp_path):
    sets = TINY + [f"grounding.cache_dir={tmp_path / 'cache'}", "generate.decoding=d3", "generate.assistant=mf",
                   "generate.assistant_weights=[0.0, 4.0]"]
    out = tmp_path / "run"
    metrics = run_method("bigrec", "ml-100k", out, sets=sets)
    d = metrics["decoding"]
    assert d["decoding"] == "d3" and d["constrained"] and d["assistant"] == "mf"
    assert d["assistant_weight"] in (0.0, 4.0) and set(d["assistant_grid"]) == {"0", "4"}
    # chosen by valid NDCG@10, then (a tie, e.g. no hit at all) by the target's mean reciprocal rank
    grid, closeness = d["assistant_grid"], d["assistant_grid_reciprocal_rank"]
    assert all(0 < v <= 1 for v in closeness.values())
    assert f"{d['assistant_weight']:g}" == max(grid, key=lambda w: (grid[w], closeness[w], -float(w)))
    gen = metrics["generation"]["test"]
    assert gen["in_catalogue"] == 1.0  # the trie: every top answer is a catalogue title
    assert 0 < gen["top_share"] <= 1 and gen["entropy_bits"] <= math.log2(8) + 1e-9
    assert {"popularity_generated", "popularity_target", "in_history", "top_titles"} <= set(gen)
    assert sum(gen["popularity_deciles_target"]) == pytest.approx(1.0)
    assert (out / "checkpoints" / "generations-valid-w0.safetensors").exists()
    assert (out / "checkpoints" / "generations-valid-w4.safetensors").exists()
    assert "Collapse diagnostics" in (out / "report.md").read_text()
    # the assistant's CF model is the injection's: trained once
    assert "bigrec+mf" in metrics["variants"]


# recorded before llm.decoding existed (commit dfe3a9b): BIGRec's test generations with these settings
BEFORE = ["model.name=tiny-random", "model.dtype=float32", "train.shots=16", "train.epochs=1",
          "train.valid_loss_size=8", "samples.valid_size=8", "samples.test_size=10", "generate.beams=2",
          "generate.max_new_tokens=6", "inject.cf_model=mf", "inject.cf_train.epochs=2", "inject.gammas=[0.0, 1.0, 8.0]"]
BEFORE_SCORES = [[-9.63073444366455, -9.699708938598633], [-9.614564895629883, -9.696365356445312],
                 [-9.618830680847168, -9.700642585754395], [-9.623612403869629, -9.700030326843262]]
BEFORE_TEXTS = ["\n\n\n\n\n\n", " excellent excellent excellent excellent excellent excellent"]


def test_bigrec_default_decoding_gives_the_numbers_recorded_before(tmp_path):
    out = tmp_path / "run"
    metrics = run_method("bigrec", "ml-100k", out, sets=BEFORE + [f"grounding.cache_dir={tmp_path / 'cache'}"])
    state = RunDir(out, resume=True).load_checkpoint("generations-test")
    assert all(row == BEFORE_TEXTS for row in state["texts"][:4])
    for row, before in zip(state["scores"][:4], BEFORE_SCORES):
        assert row == pytest.approx(before, abs=1e-6)
    assert metrics["decoding"] == {"decoding": "beam", "constrained": False}
    assert metrics["generation"]["test"]["distinct_titles"] == 1 and metrics["generation"]["test"]["top_share"] == 1.0
