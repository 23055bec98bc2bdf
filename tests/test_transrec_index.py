"""TransRec's identifier index (recalign.eval.token_index): every query against a brute-force scan of the
corpus on random corpora (hypothesis), both ways of listing the distinct next tokens, wide token ids, the
on-disk cache and the bad inputs."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recalign.errors import InputError
from recalign.eval.token_index import TokenIndex, cached_index, check_memory, estimate_bytes

END = 2


def _corpus(docs):
    return [list(d) + [END] for d in docs]


def brute_next(docs, pattern):
    """Token -> count of what follows `pattern` anywhere (an n-gram never crosses a document's end)."""
    pattern = list(pattern)
    out = Counter()
    for doc in _corpus(docs):
        for i in range(len(doc) - len(pattern)):
            if doc[i:i + len(pattern)] == pattern:
                out[doc[i + len(pattern)]] += 1
    return out


def brute_docs(docs, pattern):
    pattern = list(pattern)
    return sorted(d for d, doc in enumerate(_corpus(docs)) for i in range(len(doc) - len(pattern) + 1)
                  if doc[i:i + len(pattern)] == pattern)


def check_queries(index, docs, pattern):
    tokens, counts = index.next_tokens(pattern)
    assert list(tokens) == sorted(tokens)
    expected = brute_next(docs, pattern)
    if not pattern:  # every corpus token, the end tokens included
        expected = Counter(t for doc in _corpus(docs) for t in doc)
    assert dict(zip(tokens.tolist(), counts.tolist())) == dict(expected)
    assert index.count(pattern) == (sum(expected.values()) if pattern else index.n_tokens)
    if pattern:
        assert sorted(index.docs(pattern).tolist()) == brute_docs(docs, pattern)


alphabets = st.sampled_from([(3, 6), (3, 300), (60_000, 70_010)])  # 1-, 2- and 4-byte token widths


@st.composite
def corpora(draw):
    low, high = draw(alphabets)
    token = st.integers(low, high)
    docs = draw(st.lists(st.lists(token, min_size=1, max_size=8), min_size=1, max_size=25))
    # patterns: pieces of the documents (so most occur), plus random ones (mostly absent)
    patterns = []
    for _ in range(draw(st.integers(1, 12))):
        doc = docs[draw(st.integers(0, len(docs) - 1))]
        i = draw(st.integers(0, len(doc) - 1))
        j = draw(st.integers(i, len(doc)))
        patterns.append(doc[i:j])
    patterns += draw(st.lists(st.lists(token, min_size=1, max_size=4), max_size=4))
    return docs, patterns


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora(), st.sampled_from([0, 1, 3, 4096]))
def test_queries_match_a_brute_force_scan(data, wide_rows):
    docs, patterns = data
    # wide_rows 0: every pattern's next tokens precomputed at build time; 4096: all computed per query
    index = TokenIndex.build(docs, END, wide_rows=wide_rows)
    assert index.n_docs == len(docs) and index.n_tokens == sum(len(d) + 1 for d in docs)
    assert [index.doc(i).tolist() for i in range(len(docs))] == [list(d) for d in docs]
    for pattern in [[]] + patterns:
        check_queries(index, docs, pattern)
        # again, now answered from the cache (and extending a cached parent)
        check_queries(index, docs, pattern)
        for extra in set(brute_next(docs, pattern)) - {END}:
            check_queries(index, docs, list(pattern) + [extra])


def test_wide_patterns_are_precomputed_exactly_and_survive_the_cache(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[10, 11, int(rng.integers(20, 23)), int(rng.integers(30, 200)), 40] for _ in range(3000)]
    index = TokenIndex.build(docs, END, wide_rows=100)
    # (10, 11) and (10, 11, x) occur ~1000-3000 times: precomputed; (10, 11, 20, y) occurs a handful of times
    assert (10, 11) in index.wide and (10, 11, 20) in index.wide and (11, 21) in index.wide
    assert not any(len(p) == 4 for p in index.wide)
    assert all(index.count(p) > 100 for p in index.wide)
    for pattern in [(10, 11), (10, 11, 21), (11, 22), (10, 11, 20, 57), (57, 40)]:
        check_queries(index, docs, list(pattern))
    first, _ = cached_index(docs, END, tmp_path, wide_rows=100)
    again, cached = cached_index(docs, END, tmp_path, wide_rows=100)
    assert cached and set(again.wide) == set(index.wide) == set(first.wide)
    for p in first.wide:
        assert again.wide[p][0].tolist() == first.wide[p][0].tolist()
        assert again.wide[p][1].tolist() == first.wide[p][1].tolist()


def test_hand_checked_example():
    # " || 1 ##" " ## Comedy @@" " Toy Story" as made-up ids: 10 1 11 | 11 20 12 | 30 31 ; 10 4 11 | 11 21 12 | 32 31
    docs = [[10, 1, 11, 20, 12, 30, 31], [10, 4, 11, 21, 12, 32, 31]]
    index = TokenIndex.build(docs, END)
    assert index.next_tokens([10])[0].tolist() == [1, 4]  # after the ID marker: the two IDs
    assert index.next_tokens([11])[0].tolist() == [20, 21]  # after "##": the categories
    assert index.next_tokens([31])[0].tolist() == [END]  # a title's end is a document's end
    assert index.next_tokens([30, 31]) [0].tolist() == [END]
    assert index.next_tokens([31, END])[0].tolist() == []  # nothing crosses into the next document
    assert index.next_tokens([99])[0].tolist() == [] and index.count([99]) == 0
    assert index.docs([31]).tolist() in ([0, 1], [1, 0]) and index.docs([4, 11]).tolist() == [1]


def test_bad_documents_are_one_line_errors():
    with pytest.raises(InputError, match="document 1 has no tokens"):
        TokenIndex.build([[3], []], END)
    with pytest.raises(InputError, match="document 1 contains the end token"):
        TokenIndex.build([[3, 4], [5, END, 6]], END)
    with pytest.raises(InputError, match="no documents"):
        TokenIndex.build([], END)
    with pytest.raises(InputError, match="token ids"):
        TokenIndex.build([[-4]], END)


def test_a_corpus_too_large_for_memory_names_the_estimate():
    need = estimate_bytes(20_000_000, 49_151)
    assert 300 * 2**20 < need < 1.5 * 2**30  # 20M tokens: a few hundred MB
    with pytest.raises(InputError, match=r"20,000,000 corpus tokens need about 0\.\d GiB.*only 0\.1 GiB"):
        check_memory(20_000_000, 49_151, available=int(0.1 * 2**30))
    check_memory(20_000_000, 49_151, available=8 * 2**30)


def test_cache_on_disk(tmp_path):
    docs = [[3, 4, 5], [4, 5, 6], [7]]
    first, cached = cached_index(docs, END, tmp_path)
    assert not cached and len(list(tmp_path.glob("*.safetensors"))) == 1
    second, cached = cached_index(docs, END, tmp_path)
    assert cached and second.next_tokens([4]) [0].tolist() == first.next_tokens([4])[0].tolist() == [5]
    assert second.sa.tolist() == first.sa.tolist()
    # other documents: another entry; a corrupt entry is rebuilt
    _, cached = cached_index(docs + [[8]], END, tmp_path)
    assert not cached and len(list(tmp_path.glob("*.safetensors"))) == 2
    path = sorted(tmp_path.glob("*.safetensors"))[0]
    path.write_bytes(b"not a state")
    index, _ = cached_index(docs, END, tmp_path)
    assert index.count([4, 5]) == 2


def test_suffix_array_is_sorted_on_a_realistic_corpus():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 49_152, size=rng.integers(5, 25)).tolist() for _ in range(2000)]
    index = TokenIndex.build(docs, END)
    text = index.text[:-1].tolist()
    suffixes = [tuple(text[p:p + 6]) for p in index.sa.tolist()]
    assert suffixes == sorted(suffixes)
