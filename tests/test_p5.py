"""P5: the identifier trie, the constrained generation it drives (only catalogue identifiers on tiny-random),
the identifier indexings, and bad configs. The end-to-end run and resume are in tests/test_registry.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.errors import InputError
from recalign.llm import Backbone
from recalign.llm.trie import DEAD_END, IdTrie, TrieConstraint, decode_beams

EOS = 2


def test_trie_allows_only_continuations_of_identifiers():
    trie = IdTrie([[1, 2, EOS], [1, 2, 3, EOS], [4, EOS]])
    assert trie.allowed([]) == [1, 4]
    assert trie.allowed([1]) == [2]
    assert trie.allowed([1, 2]) == [EOS, 3]
    assert trie.allowed([1, 2, 3]) == [EOS]
    assert trie.allowed([1, 2, EOS]) == [] and trie.allowed([9]) == []
    assert trie.item([1, 2, 3, EOS]) == 1 and trie.item([1, 2]) is None and trie.item([4, EOS]) == 2
    assert trie.max_len == 4 and len(trie) == 3


def test_trie_refuses_duplicates_and_prefixes():
    with pytest.raises(InputError, match="same identifier"):
        IdTrie([[1, EOS], [1, EOS]])
    with pytest.raises(InputError, match="prefix"):
        IdTrie([[1, 2], [1, 2, 3]])
    with pytest.raises(InputError, match="empty"):
        IdTrie([[]])


def test_constraint_masks_scores_and_bans_items_per_prompt():
    trie = IdTrie([[5, EOS], [5, 6, EOS], [7, EOS]])
    prompt_a, prompt_b = [10, 11], [0, 12]  # 0 = left padding
    constraint = TrieConstraint(trie, EOS, pad_id=0, banned={(10, 11): {0}})
    scores = torch.zeros(2, 16)
    first = constraint(torch.tensor([prompt_a, prompt_b]), scores)  # the first call: prompts only
    assert set(torch.isfinite(first[0]).nonzero().flatten().tolist()) == {5, 7}
    second = constraint(torch.tensor([prompt_a + [5], prompt_b + [5]]), scores)
    assert torch.isfinite(second[0]).nonzero().flatten().tolist() == [6]  # "5" is banned for prompt a
    assert set(torch.isfinite(second[1]).nonzero().flatten().tolist()) == {EOS, 6}
    dead = constraint(torch.tensor([prompt_a + [9], prompt_b + [5]]), scores)  # 9 is no identifier: ended
    assert dead[0, EOS] == DEAD_END and torch.isfinite(dead[0]).sum() == 1 and constraint.dead_ends == 1


def test_decode_beams_keeps_whole_identifiers_once_best_first():
    trie = IdTrie([[5, EOS], [5, 6, EOS], [7, EOS]])
    items, scores = decode_beams(trie, [[5], [5, 6], [9], [7], [5]], [-2.0, -1.0, -0.5, float("-inf"), -3.0], EOS)
    assert items == [1, 0] and scores == [-1.0, -2.0]
    items, _ = decode_beams(trie, [[5]], [DEAD_END], EOS)
    assert items == []


@pytest.fixture(scope="module")
def tiny():
    return Backbone.load("tiny-random")


def test_generation_on_tiny_random_only_yields_catalogue_ids(tiny):
    from recalign.methods.p5 import build_trie, id_answers

    ids = ["1", "12", "123", "7", "42", "1000", "999", "31"]
    eos = tiny.tokenizer.eos_token
    answers = id_answers(ids, "{id}", eos)
    trie = build_trie(tiny, answers)
    prompts = ["Given the following watching history of user_5: 1, 7, 42\npredict the next movie.",
               "History: 999, 31, 12. Next?", "x"]
    banned = {tuple(tiny.tokenize(prompts[0])): {0, 3}}  # items "1" and "7" may not be generated for prompt 0
    for beams in (1, 4, 12):  # 12 > the 8 identifiers: filler beams must be dropped
        constraint = TrieConstraint(trie, tiny.tokenizer.eos_token_id, tiny.pad_id, banned)
        out = tiny.generate(prompts, num_beams=beams, max_new_tokens=trie.max_len, logits_processor=constraint,
                            length_penalty=0.0)
        for p, (texts, scores, tokens) in enumerate(zip(out.texts, out.scores.tolist(), out.token_ids)):
            real = [(t, s) for t, s in zip(texts, scores) if s == s and s > -1e8]
            assert real, "no beam returned"
            assert all(t in ids for t, _ in real), real  # only catalogue identifiers
            items, kept = decode_beams(trie, tokens, scores, tiny.tokenizer.eos_token_id)
            assert [ids[i] for i in items] == [t for t, _ in sorted(real, key=lambda x: -x[1])][:len(items)]
            assert len(items) == min(beams, len(ids) - (2 if p == 0 else 0))
            if p == 0:
                assert not {ids[i] for i in items} & {"1", "7"}


def test_cached_search_equals_transformers_beam_search_and_exact_log_probs(tiny):
    """trie_beam_search (each prompt run once) scores each identifier by log P(identifier tokens | prompt) as
    the LM loss computes it; with beams for every identifier it returns exactly what Backbone.generate +
    TrieConstraint returns; with fewer it is never worse rank by rank (it keeps every identifier finished on
    the way, transformers only those among the step's top `beams` candidates)."""
    from recalign.llm.trie import trie_beam_search
    from recalign.methods.p5 import build_trie, id_answers

    ids = ["1", "12", "123", "7", "42", "1000", "999", "31"]
    answers = id_answers(ids, "{id}", tiny.tokenizer.eos_token)
    trie = build_trie(tiny, answers)
    prompts = ["Given the following watching history of user_5: 1, 7, 42\npredict the next movie.",
               "History: 999, 31, 12. Next?", "x"]
    eos = tiny.tokenizer.eos_token_id
    for beams in (3, 8):
        found = trie_beam_search(tiny, prompts, trie, beams, batch_size=2)
        for prompt, (items, scores) in zip(prompts, found):
            out = tiny.generate([prompt], num_beams=beams, max_new_tokens=trie.max_len, length_penalty=0.0,
                                logits_processor=TrieConstraint(trie, eos, tiny.pad_id))
            hf_items, hf_scores = decode_beams(trie, out.token_ids[0], out.scores[0].tolist(), eos)
            if beams >= len(ids):
                assert items == hf_items and np.allclose(scores, hf_scores, atol=1e-3)
            else:
                assert len(items) == len(hf_items) == beams
                assert all(a >= b - 1e-3 for a, b in zip(scores, hf_scores)), (scores, hf_scores)
            exact = []
            with torch.no_grad():
                for i in items:
                    loss, n_tokens = tiny.lm_loss([prompt], [answers[i]])  # mean over the answer's tokens
                    exact.append(-loss.item() * n_tokens)
            assert np.allclose(scores, exact, atol=1e-3)
    banned = {tuple(tiny.tokenize(prompts[0])): {0, 3}}
    found = trie_beam_search(tiny, prompts, trie, 8, banned)
    assert sorted(found[0][0]) == [1, 2, 4, 5, 6, 7] and sorted(found[1][0]) == list(range(8))


def test_build_trie_refuses_answers_without_one_end_token(tiny):
    from recalign.methods.p5 import build_trie

    with pytest.raises(InputError, match="end token"):
        build_trie(tiny, ["12", "13"])


class _DS:
    """The bits of a Dataset that item_numbers reads."""

    def __init__(self, rows, n_items):
        self.interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
        self.items = pd.DataFrame({"raw_id": [f"r{i}" for i in range(n_items)]})
        self.n_items = n_items


def test_item_numbers_sequential_random_raw():
    from recalign.methods.p5 import item_numbers

    # user 0 watches items 3, 1; user 1 watches 1, 4, then (after the cutoff) 0; item 2 never
    ds = _DS([(0, 3, 1), (0, 1, 2), (1, 1, 3), (1, 4, 4), (1, 0, 9)], 5)
    assert item_numbers(ds, "sequential", 1, 0, cutoff=4) == ["4", "2", "5", "1", "3"]
    assert item_numbers(ds, "sequential", 1001, 0) == ["1004", "1002", "1005", "1001", "1003"]
    rand = item_numbers(ds, "random", 1, 7)
    assert sorted(int(x) for x in rand) == [1, 2, 3, 4, 5] and rand == item_numbers(ds, "random", 1, 7)
    assert item_numbers(ds, "raw", 1, 0) == ["r0", "r1", "r2", "r3", "r4"]


def test_prompt_fields_truncate_oldest_first():
    from recalign.methods.p5 import id_fields

    frame = pd.DataFrame({"user": [1], "history": [(0, 2, 3)]})
    (fields, n), = id_fields(frame, ["10", "11", "12", "13"], ["u0", "u1"], "movie", ", ")
    assert n == 3 and fields(3)["history"] == "10, 12, 13" and fields(2)["history"] == "12, 13"
    assert fields(3)["user"] == "u1" and fields(0)["history"] == ""


@pytest.mark.parametrize("key,value,match", [
    ("ids.indexing", "semantic", "ids.indexing"),
    ("generate.beams", 0, "generate.beams"),
    ("prompt.output", "item", "prompt.output"),
    ("prompt.instruction", "{nope}", "prompt.instruction"),
    ("eval.ks", [0], "eval.ks"),
    ("generate.decoding", "greedy", "generate.decoding"),
    ("generate.ghost_threshold", 0.0, "generate.ghost_threshold"),
    ("generate.ghost_threshold", 1.5, "generate.ghost_threshold"),
    ("generate.top_p", 0.0, "generate.top_p"),
    ("ids.seed", -1, "ids.seed"),
    ("ids.separator", "", "ids.separator"),
    ("ids.separator", " 1 ", "ids.separator"),
])
def test_bad_config_is_one_error_naming_the_key(key, value, match):
    import copy

    from recalign.methods.p5 import DEFAULTS, validate

    cfg = copy.deepcopy(DEFAULTS)
    section, name = key.split(".")
    cfg[section][name] = value
    cfg["model"]["name"] = "tiny-random"
    with pytest.raises(InputError, match=match):
        validate(cfg)


def test_ranks_from_beams_match_hand_computed():
    """Beam items rank by score; every other item ties below them (expected rank); history is masked."""
    from recalign.eval.metrics import target_ranks

    scores = torch.full((2, 6), -1e30)
    scores[0, torch.tensor([4, 2])] = torch.tensor([-1.0, -2.0])
    scores[1, torch.tensor([1])] = torch.tensor([-0.5])
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 1] = True  # case 1's only beam is a history item
    ranks = target_ranks(scores, torch.tensor([2, 3]), mask)
    # case 0: one item above; case 1: 5 unscored candidates (0, 2, 3, 4, 5), the target ties with 4 others
    assert ranks.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("decoding", ["d3", "sample"])
def test_shared_decodings_return_only_catalogue_ids_and_respect_bans(tiny, decoding, tmp_path):
    """generate.decoding d3 / sample run llm.decoding's loops under P5's identifier trie: every returned
    sequence is a catalogue identifier, each at most once per case, and banned (history) items never appear."""
    from types import SimpleNamespace

    from recalign.io import Checkpoints
    from recalign.methods.p5 import DEFAULTS, build_trie, id_answers, shared_decoding

    ids = ["1", "12", "123", "7", "42", "1000", "999", "31"]
    trie = build_trie(tiny, id_answers(ids, "{id}", tiny.tokenizer.eos_token))
    prompts = ["Given the following watching history of user_5: 1, 7, 42\npredict the next movie.",
               "History: 999, 31, 12. Next?"]
    banned = {tuple(tiny.tokenize(prompts[0])): {0, 3}}
    config = {**DEFAULTS, "generate": {**DEFAULTS["generate"], "decoding": decoding, "beams": 4, "samples": 16}}
    ctx = SimpleNamespace(config=config, run=Checkpoints(tmp_path), seed=0)
    items, scores, returned = shared_decoding(ctx, tiny, prompts, trie, ids, banned)
    assert returned >= sum(len(row) for row in items) > 0
    for case, (row, values) in enumerate(zip(items, scores)):
        assert row and len(row) == len(set(row)) and set(row) <= set(range(len(ids)))
        assert values == sorted(values, reverse=True)
        if case == 0:
            assert not set(row) & {0, 3}


def test_raw_ids_holding_the_separator_are_refused_before_training(tmp_path, monkeypatch, capsys):
    from cli_helpers import invoke

    rows = ["user_id,item_id,rating,timestamp"] + [f"u{u},\"item, {(u + t) % 7}\",4,{t}" for u in range(8)
                                                     for t in range(6)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "interactions.csv").write_text("\n".join(rows) + "\n")
    code, _, err = invoke(monkeypatch, capsys, "run", "p5", "--dataset", str(tmp_path / "d"), "--set",
                          "model.name=tiny-random", "--set", "ids.indexing=raw", "--set", "samples.history_len=2",
                          "--out", str(tmp_path / "run"))
    assert code == 2 and "holds ids.separator ', '" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
