"""GPT4Rec: BM25 retrieval over item texts (exact titles are found), the merge of per-query result lists
(by hand), per-K evaluation of the merged lists, bad configs. The end-to-end run and resume are in
tests/test_registry.py."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

from recalign.errors import InputError
from recalign.eval.retrieval import BM25Index, merge, merge_round_robin, merge_split, merged_ranks

TEXTS = ["Toy Story (1995) Animation Children's Comedy", "GoldenEye (1995) Action Adventure Thriller",
         "Four Rooms (1995) Thriller", "Star Wars (1977) Action Adventure Romance Sci-Fi War",
         "Star Trek: The Wrath of Khan (1982) Action Adventure Sci-Fi", "Return of the Jedi (1983) Action Sci-Fi"]


def test_bm25_finds_an_item_by_its_exact_title_and_excludes():
    index = BM25Index(TEXTS)
    assert index.search("Star Wars (1977)", 3)[0].tolist()[0] == 3
    assert index.search("Four Rooms (1995)", 1)[0].tolist() == [2]
    items, scores = index.search("star", 5)
    assert sorted(items.tolist()) == [3, 4] and np.all(np.diff(scores) <= 0)
    assert index.search("Star Wars (1977)", 3, exclude=[3])[0].tolist()[0] == 4
    # no indexed word (unknown or stop words only): nothing is retrieved, every score is zero
    assert index.search("the of", 5)[0].size == 0 and index.search("zzzz", 5)[0].size == 0
    assert not index.scores("").any()


def test_bm25_scores_are_bm25():
    """Lucene's BM25 by hand for a one-word query: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part =
    tf / (tf + k1 (1 - b + b |d| / avgdl)) (Lucene drops the constant factor k1 + 1: same ranking)."""
    docs = ["apple banana", "apple apple cherry date", "cherry"]
    k1, b = 1.2, 0.75
    index = BM25Index(docs, k1=k1, b=b, stopwords=None)
    lengths = np.array([2, 4, 1])
    avgdl = lengths.mean()
    idf = np.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    tf = np.array([1, 2, 0])
    expected = idf * tf / (tf + k1 * (1 - b + b * lengths / avgdl))
    assert np.allclose(index.scores("apple"), expected, atol=1e-5)


def test_bm25_finds_ml100k_items_by_exact_title():
    from recalign.data import load_dataset
    from recalign.methods.gpt4rec import DEFAULTS, item_texts

    ds = load_dataset("ml-100k")
    titles = ds.titles()
    index = BM25Index(item_texts(ds, DEFAULTS["retrieval"]["item_text"]))
    counts = Counter(titles)
    unique = [i for i, t in enumerate(titles) if counts[t] == 1]
    top1 = np.mean([index.search(titles[i], 1)[0].tolist() == [i] for i in unique])
    top5 = np.mean([i in index.search(titles[i], 5)[0].tolist() for i in unique])
    assert top1 >= 0.995 and top5 >= 0.999, (top1, top5)  # measured: 0.9988 / 0.9994 of 1,646 titles


def test_merge_split_is_the_papers_k_over_m_per_query():
    lists = [[1, 2, 3, 4], [2, 5, 6], [7]]
    # K = 4, m = 3: quotas 2, 1, 1; query 2's first item (2) is taken, so its next one (5)
    assert merge_split(lists, 4) == [1, 2, 5, 7]
    # K = 6: quotas 2, 2, 2; query 3 runs out after one item, its slot goes round the queries again
    assert merge_split(lists, 6) == [1, 2, 5, 6, 7, 3]
    assert merge_split(lists, 2) == [1, 2]  # K < m: the first K queries, one item each
    assert merge_split(lists, 1) == [1]
    assert merge_split(lists, 20) == [1, 2, 3, 4, 5, 6, 7]  # quotas 7, 7, 6: every item, each once
    assert merge_split([[], [], [9]], 2) == [9] and merge_split([], 3) == []


def test_merge_round_robin_interleaves_ranks():
    lists = [[1, 2, 3, 4], [2, 5, 6], [7]]
    assert merge_round_robin(lists, 10) == [1, 2, 7, 5, 3, 6, 4]
    assert merge_round_robin(lists, 3) == [1, 2, 7]
    with pytest.raises(InputError, match="merge"):
        merge(lists, 3, "rrf")


def test_merged_ranks_per_k():
    lists = [[[1, 2, 3, 4], [2, 5, 6], [7]], [[8], [9]]]
    ranks = merged_ranks(lists, [7, 9], [1, 4, 6])
    assert ranks[1].tolist() == [np.inf, np.inf]
    assert ranks[4].tolist() == [3.0, 1.0]  # [1, 2, 5, 7] / [8, 9]
    assert ranks[6].tolist() == [4.0, 1.0]  # [1, 2, 5, 6, 7, 3]
    from recalign.eval.metrics import ranking_metrics

    assert ranking_metrics(ranks[4], [4])["hr@4"] == 1.0
    assert np.isclose(ranking_metrics(ranks[4], [4])["ndcg@4"], (1 / np.log2(5) + 1 / np.log2(3)) / 2)


def test_an_index_of_stop_words_only_is_one_error():
    with pytest.raises(InputError, match="no item text holds a word to index"):
        BM25Index(["the", "a an", ""])


@pytest.mark.parametrize("key,value,match", [
    ("retrieval.merge", "rrf", "retrieval.merge"),
    ("retrieval.b", 1.5, "retrieval.b"),
    ("retrieval.k1", -1, "retrieval.k1"),
    ("retrieval.item_text", "{plot}", "retrieval.item_text"),
    ("retrieval.item_text", "", "retrieval.item_text: empty template"),
    ("retrieval.stopwords", "fr", "retrieval.stopwords"),
    ("generate.queries", 0, "generate.queries"),
    ("prompt.output", "{year}", "prompt.output"),
])
def test_bad_config_is_one_error_naming_the_key(key, value, match):
    from recalign.methods.gpt4rec import DEFAULTS, validate

    cfg = copy.deepcopy(DEFAULTS)
    section, name = key.split(".")
    cfg[section][name] = value
    cfg["model"]["name"] = "tiny-random"
    with pytest.raises(InputError, match=match):
        validate(cfg)


def test_cached_beam_search_equals_transformers_beam_search():
    """Free-text beam search with the prompt run once returns transformers' beams and scores (tiny-random)."""
    from recalign.llm import Backbone
    from recalign.llm.trie import cached_beam_search

    tiny = Backbone.load("tiny-random")
    prompts = ['Previously, the user watched: "Toy Story (1995)", "Heat (1995)". In the future', "Hello", "x y z"]
    for beams, lp in ((1, 1.0), (4, 0.0), (4, 1.0)):
        out = tiny.generate(prompts, num_beams=beams, max_new_tokens=6, length_penalty=lp)
        mine = cached_beam_search(tiny, prompts, beams, 6, length_penalty=lp, batch_size=2)
        for p in range(len(prompts)):
            assert [tuple(t) for t in out.token_ids[p]] == [t for t, _ in mine[p]]
            assert np.allclose(out.scores[p].tolist(), [s for _, s in mine[p]], atol=1e-3)
