"""TransRec: aggregated grounding by hand, the constrained-decoding LogitsProcessor (hand-computed allowed
continuations, dead ends, forced markers) and constrained beam search on the tiny random Llama, the item
identifiers and their training answers on ML-100K, and the method's bad inputs."""

import math

import numpy as np
import pytest
import torch

from recalign.errors import InputError
from recalign.eval.ngram_grounding import GroundingParams, Key, evidence, item_scores, key_weights
from recalign.eval.token_index import TokenIndex
from recalign.io import Checkpoints
from recalign.llm.constrained import FacetRule, IndexConstraint, constrained_generate_step, keys_of

END = 2


# ------------------------------------------------------------------------------------------ grounding
def test_key_weight_is_the_papers_formula():
    params = GroundingParams(gamma=2.0, biases={"title": 0.0, "id": 9.0}, smoothing=5.0, max_log_prob=-1.0)
    w = key_weights([-3.0, -3.0, -0.5, -30.0], [1, 40, 1, 1], ["title", "title", "id", "title"], 10_000, params)

    def by_hand(s, count):
        pc = (count + 5.0) / (10_000 + 5.0)
        return max(0.0, (s + math.log(1 - pc)) - (math.log(pc) + math.log(1 - math.exp(s)))) ** 2

    assert w[0] == pytest.approx(by_hand(-3.0, 1))
    assert w[1] == pytest.approx(by_hand(-3.0, 40)) and w[1] < w[0]  # frequent n-grams say less
    assert w[2] == pytest.approx(by_hand(-1.0, 1))  # -0.5 + 9 capped at -1
    assert w[0] == pytest.approx(20.0, abs=0.1) and w[1] == pytest.approx(6.0, abs=0.1)
    assert w[3] == 0.0  # improbable: negative log-odds clipped at 0
    assert key_weights([-3.0], [0], ["title"], 10_000, params)[0] == 0.0  # not in the corpus
    gamma1 = GroundingParams(gamma=1.0, smoothing=5.0)
    assert key_weights([-3.0], [1], ["title"], 10_000, gamma1)[0] == pytest.approx(math.sqrt(by_hand(-3.0, 1)))


def test_item_scores_by_hand():
    # doc 0: 5 6 7 | doc 1: 6 7 8 | doc 2: 9 5 6
    docs = [[5, 6, 7], [6, 7, 8], [9, 5, 6]]
    index = TokenIndex.build(docs, END)
    params = GroundingParams(gamma=1.0, smoothing=0.01, coverage=0.5, max_log_prob=-1.0)
    keys = [Key((6, 7), -1.0, "title"), Key((5, 6), -1.2, "title"), Key((8,), -1.5, "title"),
            Key((6, 7), -4.0, "id"),  # the same n-gram generated again, less probable: ignored
            Key((4,), -1.0, "title")]  # not in the corpus
    ev = evidence(keys, index)
    assert [k.tokens for k in ev.keys] == [(4,), (5, 6), (6, 7), (8,)] and ev.counts.tolist() == [0, 2, 2, 1]
    n = index.n_tokens  # 12
    w = {k.tokens: key_weights([k.log_prob], [c], ["title"], n, params)[0] for k, c in zip(ev.keys, ev.counts)}
    assert w[(6, 7)] > w[(5, 6)] > 0 and w[(8,)] > 0
    scores = item_scores(ev, params)
    # doc 0: (6,7) counts fully; (5,6) overlaps it at token 6 -> skipped there
    # doc 1: (6,7) fully; then (8,): new token type -> full weight
    # doc 2: (5,6) first key there: full weight
    assert scores[0] == pytest.approx(w[(6, 7)])
    assert scores[1] == pytest.approx(w[(6, 7)] + w[(8,)])
    assert scores[2] == pytest.approx(w[(5, 6)])
    # coverage: doc 0 = 5 6 7 8 5; keys (6,7) then (8,5): 5 is new, 8 is new -> full; then (5,) alone at the
    # last position is free but token type 5 is covered -> 1 - beta
    index = TokenIndex.build([[5, 6, 7, 8, 5]], END)
    ev = evidence([Key((6, 7), -1.0, "t"), Key((7, 8), -1.1, "t"), Key((8, 5), -1.2, "t"), Key((5,), -1.0, "t")],
                  index)
    ws = {k.tokens: key_weights([k.log_prob], [c], ["t"], index.n_tokens, params)[0] for k, c in zip(ev.keys, ev.counts)}
    assert ws[(6, 7)] > ws[(7, 8)] > ws[(8, 5)] > ws[(5,)] > 0
    # (7, 8) overlaps (6, 7); (8, 5) is free at positions 3-4; (5,) free at position 0, type 5 already covered
    assert item_scores(ev, params)[0] == pytest.approx(ws[(6, 7)] + ws[(8, 5)] + 0.5 * ws[(5,)])


def test_facet_biases_and_subsets():
    filler = [[30 + i % 40, 80 + i % 7] for i in range(200)]
    index = TokenIndex.build([[10, 1, 11], [10, 3, 11], [20, 21]] + filler, END)
    keys = [Key((10, 1, 11), -6.0, "id"), Key((20, 21), -3.0, "title")]
    ev = evidence(keys, index)
    plain = item_scores(ev, GroundingParams(gamma=2.0, biases={"id": 0.0}))
    biased = item_scores(ev, GroundingParams(gamma=2.0, biases={"id": 9.0}))
    assert plain[0] == 0.0 and plain[2] > 0  # an improbable ID alone says nothing; the bias makes it count
    assert biased[0] > plain[0] and biased[2] == plain[2] and biased[1] == plain[1] == 0.0
    assert item_scores(ev.subset(["title"]), GroundingParams())[0] == 0.0
    assert item_scores(ev.subset(["id"]), GroundingParams())[2] == 0.0


# ------------------------------------------------------------------------------------- the processor
@pytest.fixture(scope="module")
def tiny():
    from recalign.llm import Backbone

    return Backbone.load("tiny-random")


def tiny_catalogue(backbone):
    tok = backbone.tokenize_piece
    titles = [" Toy Story (1995)", " GoldenEye (1995)", " Four Rooms (1995)", " Toy Soldiers (1991)"]
    ids = [tok(f" || {i + 1} ##") for i in range(len(titles))]
    docs = [i + tok(" ## Comedy @@")[1:] + tok(t) for i, t in zip(ids, titles)]
    return TokenIndex.build(docs, backbone.tokenizer.eos_token_id), ids, [tok(t) for t in titles]


def step(index, rule, eos, generated, scores, prompt=(1, 55, 66)):
    """The processor's output for one beam that has generated `generated` after `prompt`: a first call on the
    bare prompt (a generate() call starts), then the call for the beam's current tokens."""
    proc = IndexConstraint(index, eos, rule, pad_id=0)
    out = proc(torch.tensor([list(prompt)]), scores)
    if generated:
        out = proc(torch.tensor([list(prompt) + list(generated)]), scores)
    return out[0]


def finite(row):
    return torch.isfinite(row).nonzero().flatten().tolist()


def test_processor_allows_exactly_the_corpus_continuations(tiny):
    tok = tiny.tokenize_piece
    index, ids, titles = tiny_catalogue(tiny)
    eos = tiny.tokenizer.eos_token_id
    scores = torch.log_softmax(torch.randn(1, len(tiny.tokenizer)), -1)
    toy = tok(" Toy")
    corpus_tokens = sorted(set(t for d in range(index.n_docs) for t in index.doc(d).tolist()))
    first = step(index, FacetRule(), eos, [], scores)
    assert finite(first) == corpus_tokens  # position-free: any corpus token may start (never the end token)
    assert torch.equal(first[corpus_tokens], scores[0, corpus_tokens])  # with the model's log-probabilities
    assert finite(step(index, FacetRule(), eos, toy, scores)) == sorted({tok(" Story")[0], tok(" Soldiers")[0]})
    assert finite(step(index, FacetRule(), eos, toy + tok(" Story"), scores)) == [tok(" (")[0]]
    assert finite(step(index, FacetRule(), eos, titles[0], scores)) == [eos]  # a whole title: the document ends
    dead = step(index, FacetRule(), eos, [77, 78], scores)  # not in the corpus: the beam is ended
    assert finite(dead) == [eos] and dead[eos] == 0.0


def test_processor_forces_the_markers_and_ends_whole_identifiers(tiny):
    tok = tiny.tokenize_piece
    index, ids, _ = tiny_catalogue(tiny)
    eos = tiny.tokenizer.eos_token_id
    rule = FacetRule(tuple(tok(" ||")), (tuple(tok(" ##")),))
    scores = torch.log_softmax(torch.randn(1, len(tiny.tokenizer)), -1)
    first = step(index, rule, eos, [], scores)
    assert finite(first) == tok(" ||") and first[tok(" ||")[0]] == 0.0  # forced, at no cost
    assert finite(step(index, rule, eos, tok(" ||"), scores)) == sorted({i[1] for i in ids})  # the IDs' first tokens
    done = step(index, rule, eos, ids[2], scores)
    assert finite(done) == [eos] and done[eos] == 0.0  # a whole ID: ended, at no cost
    assert finite(step(index, rule, eos, tok(" Toy"), scores)) == [eos]  # not the forced marker: ended
    assert rule.complete(ids[0]) and not rule.complete(ids[0][:-1]) and not rule.complete(tok(" Toy"))


def test_title_generation_starts_with_a_span_start_word(ml, tiny):
    """With `title_starts`, the title facet starts with a word a trained span can start with (never the year or
    an article alone), anywhere in the corpus, and is free once that word is complete."""
    from recalign.tasks.identifiers import title_start_words

    texts, plain = corpus_of(ml, tiny.tokenizer)
    words = title_start_words(texts)
    assert "Story" in words and "(1995)" not in words and "The" not in words and "Se7en)" not in words
    from recalign.llm.constrained import IdentifierCorpus

    corpus = IdentifierCorpus(texts, tiny.tokenizer, FACETS["markers"], [str(r) for r in ml.items["raw_id"]], words)
    assert corpus.docs == plain.docs  # the documents do not change, only where generation may start
    index = TokenIndex.build(corpus.docs, tiny.tokenizer.eos_token_id)
    eos = tiny.tokenizer.eos_token_id
    scores = torch.log_softmax(torch.randn(1, len(tiny.tokenizer)), -1)
    tok = tiny.tokenize_piece
    rule = corpus.rules["title"]
    first = set(finite(step(index, rule, eos, [], scores)))
    assert tok(" Story")[0] in first and tok(" Fields")[0] in first
    # " The" only starts the word "The)" (a span start: "the)" is no stopword), so the article can not end there
    assert finite(step(index, rule, eos, tok(" The"), scores)) == tok(")")
    after_paren = finite(step(index, rule, eos, tok(" ("), scores))  # only from a word like "(Se7en)"
    assert after_paren and tok("1")[0] not in after_paren  # a year can not be generated on its own
    assert tok(" (")[0] in finite(step(index, rule, eos, tok(" Story"), scores))  # past the first word: free
    assert finite(step(index, FacetRule(), eos, tok(" ("), scores)).count(tok("1")[0]) == 1  # without the rule


def test_constrained_beam_search_returns_only_corpus_sequences_with_their_log_probs(tiny, tmp_path):
    index, ids, titles = tiny_catalogue(tiny)
    tok = tiny.tokenize_piece
    prompts = ["<|im_start|>user\nrecommend a movie<|im_end|>\n<|im_start|>assistant\n", "hello", "which one?"]
    store = Checkpoints(tmp_path)
    rule = FacetRule(tuple(tok(" ||")), (tuple(tok(" ##")),))
    outs = {}
    for facet_rule, max_new in ((FacetRule(), 12), (rule, 8)):
        name = f"test-{len(facet_rule.start)}"
        out = outs[name] = constrained_generate_step(store, tiny, prompts, name, index, facet_rule, beams=4,
                                                     max_new_tokens=max_new, block=2)
        assert len(out["tokens"]) == 3
        for row_tokens, row_lp, row_scores in zip(out["tokens"], out["log_probs"], out["scores"]):
            assert row_tokens and len(row_tokens) <= 4
            for seq, lps, score in zip(row_tokens, row_lp, row_scores):
                assert index.count(seq) > 0  # validity 100%
                assert len(lps) == len(seq) and all(lp <= 0 for lp in lps)
                if facet_rule.start:
                    assert facet_rule.complete(seq) and tuple(seq) in {tuple(i) for i in ids}
                    assert sum(lps) == pytest.approx(score, abs=1e-4)  # forced markers and EOS cost nothing
                else:
                    assert sum(lps) >= score - 1e-4  # the beam score adds the end token's log-prob
    # resumable: a second call reads the checkpoint instead of generating
    again = constrained_generate_step(store, None, prompts, "test-0", index, FacetRule(), beams=4,
                                      max_new_tokens=12, block=2)
    assert again == outs["test-0"]


def test_keys_of_beams():
    rule = FacetRule((10,), ((11,),))
    tokens, lps = [[10, 1, 11], [10, 4]], [[0.0, -1.0, -0.5], [0.0, -2.0]]
    ids = keys_of(tokens, lps, rule, prefixes=False, make=lambda n, lp: (n, lp))
    assert ids == [((10, 1, 11), -1.5)]  # the incomplete ID is not a key
    spans = keys_of([[5, 6, 7]], [[-1.0, -2.0, -3.0]], FacetRule(), prefixes=True, make=lambda n, lp: (n, lp))
    assert spans == [((5,), -1.0), ((5, 6), -3.0), ((5, 6, 7), -6.0)]


# -------------------------------------------------------------------------------- the method's parts
@pytest.fixture(scope="module")
def ml():
    from recalign.data import load_dataset

    return load_dataset("ml-100k")


FACETS = {"use": ["id", "title", "attribute"], "markers": {"id": ["||", "##"], "attribute": ["##", "@@"]}}


def corpus_of(ds, tokenizer, use=FACETS["use"]):
    from recalign.llm.constrained import IdentifierCorpus
    from recalign.tasks.identifiers import facet_texts

    texts = facet_texts(ds, use, FACETS["markers"])
    return texts, IdentifierCorpus(texts, tokenizer, FACETS["markers"], [str(r) for r in ds.items["raw_id"]])


@pytest.fixture(scope="module")
def catalogue(ml, tiny):
    return corpus_of(ml, tiny.tokenizer)[1]


def test_the_method_defaults_are_the_references_identifiers():
    from recalign.methods import get_method

    facets = get_method("transrec").defaults["facets"]
    assert facets["use"] == FACETS["use"] and facets["markers"] == FACETS["markers"]


def test_identifiers_documents_and_answers_on_ml100k(ml, tiny):
    from recalign.methods import get_method
    from recalign.tasks.identifiers import facet_answers
    from recalign.tasks.next_item import generative_samples

    texts, cat = corpus_of(ml, tiny.tokenizer)
    text = tiny.tokenizer.decode(cat.docs[0])
    assert text == " || 1 ## Animation @@ ## Children's @@ ## Comedy @@ Toy Story (1995)"  # the reference layout
    index = TokenIndex.build(cat.docs, tiny.tokenizer.eos_token_id)
    samples = get_method("transrec").defaults["samples"]
    split, _, _ = generative_samples(ml, {**samples, "valid_size": 10, "test_size": 10})
    eos = tiny.tokenizer.eos_token
    out = facet_answers(texts, split.train["item"].tolist()[:300], FACETS["use"], 3, eos, seed=0)
    assert set(out) == {"id", "title", "attribute"} and all(len(v) == 300 for v in out.values())
    for facet, answers in out.items():
        for answer in answers:
            body = answer[:-len(eos)] if answer.endswith(eos) else answer
            assert index.count(tiny.tokenize_piece(body)) > 0, (facet, answer)  # every answer is in the corpus
    assert all(a.startswith(" || ") and a.endswith(" ##" + eos) for a in out["id"])
    assert any(not a.endswith(eos) for a in out["title"])  # 3-word spans that stop inside a title: no end token
    # the ID rule recognises every item's whole ID; the attribute marker is always followed by a category
    assert all(cat.rules["id"].complete(t[0]) for t in cat.tokens["id"])
    after = index.next_tokens(list(cat.rules["attribute"].start))[0].tolist()
    firsts = {ids[len(cat.rules["attribute"].start)] for per_item in cat.tokens["attribute"] for ids in per_item}
    assert set(after) == firsts


def test_title_spans():
    from recalign.tasks.identifiers import title_span

    rng = np.random.default_rng(0)
    words = "The Lord of the Rings (2001)".split()
    spans = {title_span(words, 10, rng) for _ in range(200)}
    assert all(s.startswith(" ") for s, _ in spans) and all(whole for _, whole in spans)
    starts = {s.split()[0] for s, _ in spans}
    assert starts == {"Lord", "Rings"}  # never at a stopword or the year
    assert title_span(words, 0, rng) == (" The Lord of the Rings (2001)", True)
    assert title_span(["Up"], 10, rng) == (" Up", True)


def test_items_without_a_facet_text_are_one_line_errors(ml, tiny):
    def broken(column, row, value, year=None):
        items = ml.items.copy()
        items.at[row, column] = value
        if year is not None:
            items.at[row, "year"] = year
        return type(ml)(ml.name, ml.interactions, items, ml.users, ml.like_threshold, ml.domain, ml.source, {})

    no_genres = broken("categories", 5, [])
    with pytest.raises(InputError, match=r"item '6' has no categories \(facet attribute\)"):
        corpus_of(no_genres, tiny.tokenizer)
    corpus_of(no_genres, tiny.tokenizer, use=["id", "title"])  # fine without the attribute facet
    with pytest.raises(InputError, match=r"item '4' has no title"):
        corpus_of(broken("title", 3, "  ", year=float("nan")), tiny.tokenizer)
    with pytest.raises(InputError, match="end-of-sequence"):
        corpus_of(broken("title", 3, "Bad <|im_end|> title"), tiny.tokenizer)
    # an id, category or title holding a facet marker would end or fake an identifier
    with pytest.raises(InputError, match=r"item '3': its title 'A || 7 ## fake' holds the facet marker '(\|\||##)'"):
        corpus_of(broken("title", 2, "A || 7 ## fake"), tiny.tokenizer)
    with pytest.raises(InputError, match=r"item '6': its category 'Sci@@Fi' holds the facet marker '@@'"):
        corpus_of(broken("categories", 5, ["Sci@@Fi"]), tiny.tokenizer)
    from recalign.llm.constrained import IdentifierCorpus
    from recalign.tasks.identifiers import facet_texts

    # identifiers whose tokens do not start with the facet's opening marker as the rule tokenises it
    with pytest.raises(InputError, match=r"facets.markers.id: .* tokenise differently inside item '1'"):
        IdentifierCorpus(facet_texts(ml, ["id"], {"id": ["<", ">"]}), tiny.tokenizer, {"id": ["<<", ">"]},
                         [str(r) for r in ml.items["raw_id"]])


@pytest.mark.parametrize("sets, message", [
    (["facets.use=[id, genre]"], "facets.use"),
    (["facets.use=[]"], "facets.use"),
    (["facets.markers.id=['||']"], "facets.markers.id"),
    (["grounding.gamma=0"], "grounding.gamma"),
    (["grounding.grid.gamma=[]"], "grounding.grid.gamma"),
    (["grounding.select_metric=auc"], "grounding.select_metric"),
    (["generate.max_new_tokens.title=0"], "generate.max_new_tokens.title"),
    (["grounding.bias.id=yes"], "grounding.bias.id"),
    (["facets.title_start=anywhere"], "facets.title_start"),
])
def test_bad_config_is_exit_2_with_one_line(monkeypatch, capsys, tmp_path, sets, message):
    from cli_helpers import invoke

    args = ["run", "transrec", "--dataset", "ml-100k", "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    code, _, err = invoke(monkeypatch, capsys, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_planted_keys_rank_the_target_first_on_the_real_catalogue(ml, tiny, catalogue):
    """Step 3 on the real code path: beams that name the target (its ID; a span of its title) put it at rank 0
    of the 1,682 items; a beam naming an item of the user's history is masked; no matching beam: a tie."""
    import pandas as pd

    from recalign.eval.ngram_grounding import GroundingParams
    from recalign.methods.transrec import CaseSet
    from recalign.tasks.next_item import history_mask

    cat = catalogue
    index = TokenIndex.build(cat.docs, tiny.tokenizer.eos_token_id)
    targets = [49, 180, 99]  # Star Wars (1977), Return of the Jedi (1983), Fargo (1996)
    history_item = 120
    title_span = tiny.tokenize_piece(" Return of the Jedi")
    beams = {
        "id": {"tokens": [[cat.tokens["id"][history_item][0], cat.tokens["id"][49][0]], [], []],
               "log_probs": [[[-0.1] * len(cat.tokens["id"][history_item][0]), [-0.5] * len(cat.tokens["id"][49][0])],
                             [], []]},
        # probable enough that every prefix reaches the cap: the rarest (longest) prefix then scores highest
        "title": {"tokens": [[], [title_span], []], "log_probs": [[], [[-0.2] * len(title_span)], []]},
    }
    keys = [[], [], []]
    for facet, state in beams.items():
        for case, (tokens, lps) in enumerate(zip(state["tokens"], state["log_probs"])):
            keys[case] += keys_of(tokens, lps, cat.rules[facet], prefixes=(facet == "title"),
                                  make=lambda n, lp, f=facet: Key(n, lp, f))
    histories = [np.asarray([history_item]), np.asarray([], dtype=np.int64), np.asarray([], dtype=np.int64)]
    cases = CaseSet(pd.DataFrame({"user": [0, 1, 2], "item": targets}), histories, torch.tensor(targets),
                    history_mask(histories, ml.n_items), beams, keys, [evidence(k, index) for k in keys])
    params = GroundingParams(gamma=2.0, biases={"id": 9.0, "title": 0.0, "attribute": 6.0})
    ranks = cases.ranks(params).tolist()
    assert ranks[0] == 0.0  # the history item's ID was more probable, but it is masked
    assert ranks[1] == 0.0  # the title span's longest prefix only occurs in the target's title
    n_candidates = ml.n_items
    assert ranks[2] == pytest.approx((n_candidates - 1) / 2)  # every item scores 0: the expected rank of a tie
    assert cases.target_scores(params)[2] == 0.0 and cases.target_scores(params)[1] > 0
    # the ID facet alone cannot find case 1's target; the title facet alone cannot find case 0's
    assert cases.ranks(params, ["id"]).tolist()[1] > 0 and cases.ranks(params, ["title"]).tolist()[0] > 0


def test_an_identifier_that_tokenises_to_nothing_is_a_one_line_error():
    from recalign.llm.constrained import IdentifierCorpus

    class Dropping:  # a tokenizer that drops characters it does not know
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            one = lambda t: [ord(c) for c in t if c.isascii() and not c.isspace()]  # noqa: E731
            return {"input_ids": [one(t) for t in texts] if isinstance(texts, list) else one(texts)}

    texts = {"title": [[" Up"], [" \u00e9\u00e8"]]}
    with pytest.raises(InputError, match=r"item 'b': its title identifier ' \u00e9\u00e8' tokenises to nothing"):
        IdentifierCorpus(texts, Dropping(), {}, ["a", "b"])


def test_the_method_end_to_end_on_a_tiny_model(tmp_path):
    """A whole run (tiny random Llama, a slice of ML-100K): every generated beam occurs in the corpus, every
    trained answer too, the groups partition the test cases, and cases-test.json holds every variant's rank."""
    import json

    from recalign import assets
    from recalign.data import load_dataset
    from recalign.runner import run_method
    from recalign.tasks.identifiers import facet_texts, title_start_words

    source = assets.fetch("ml-100k")
    lines = (source / "ml-100k.inter").read_text().splitlines()
    (tmp_path / "small.inter").write_text("\n".join([lines[0], *[l for l in lines[1:] if int(l.split("\t")[0]) <= 60]]) + "\n")
    (tmp_path / "small.item").write_text((source / "ml-100k.item").read_text())
    sets = ["model.name=tiny-random", "train.shots=6", "train.epochs=1", "train.valid_loss_size=2",
            "samples.valid_size=3", "samples.test_size=5", "generate.beams=3",
            "generate.max_new_tokens={id: 6, title: 5, attribute: 8}", f"grounding.cache_dir={tmp_path / 'index'}",
            "grounding.grid={gamma: [1.0, 2.0], id: [0.0, 9.0], title: [0.0], attribute: [6.0]}"]
    run_method("transrec", str(tmp_path / "small.inter"), tmp_path / "run", sets=sets)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["validity"] == {"valid": 1.0, "test": 1.0}
    assert metrics["answers_in_index"] == 1.0 and metrics["samples"]["train_examples"] == 18
    gen = metrics["generation"]["test"]
    assert gen["beams"] > 0 and gen["id"]["complete"] == 1.0 and gen["attribute"]["complete"] == 1.0
    low, high = metrics["test"]["ndcg@10_ci"]  # the headline metrics carry their intervals
    assert low <= metrics["test"]["ndcg@10"] <= high and len(metrics["test"]["hr@5_ci"]) == 2
    groups = metrics["groups"]
    assert groups["warm"] + groups["cold"] == 5 == groups["dense"] + groups["sparse"]
    assert set(metrics["variants"]) == {"transrec", "id facet only", "title facet only", "attribute facet only",
                                        "transrec (valid-chosen gamma, biases)"}
    grid = metrics["variants"]["transrec (valid-chosen gamma, biases)"]["grid"]
    assert len(grid) == 1 + 2 * 2  # the configured setting, then the grid
    cases = json.loads((tmp_path / "run" / "cases-test.json").read_text())
    assert len(cases) == 5 and all({"rank", "rank_id_only", "rank_title_only", "rank_attribute_only",
                                    "rank_tuned"} <= set(c) for c in cases)
    starts = title_start_words(facet_texts(load_dataset(str(tmp_path / "small.inter")), ["title"], {}))
    for c in cases:
        assert 0 <= c["rank"] < 1682 and set(c["generated"]) == {"id", "title", "attribute"}
        first = c["generated"]["title"]["text"].split()[0]  # facets.title_start "word": a span's start word
        assert any(w.startswith(first) for w in starts), first
    assert {k for k in metrics["test"] if k.endswith("_warm")} == {"ndcg@5_warm", "ndcg@10_warm", "recall@5_warm",
                                                                     "recall@10_warm"} or groups["warm"] == 0
