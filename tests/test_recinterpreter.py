"""RecInterpreter: the title matcher (cases computed by hand), the probe windows, the projector slot (the soft
token reaches the LLM's input embeddings at the placeholder; only the projector gets gradients), the controls'
helpers, config errors, and a run on the tiny random Llama."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.data import build_dataset
from recalign.errors import InputError
from recalign.llm import Backbone, TrainConfig, tiny_llama, load_tokenizer, train_slot_modules
from recalign.llm.slots import SeqProjector
from recalign.tasks.interpret import (TitleMatcher, bootstrap_interval, extract_answer, normalise, other_user_rows,
                                      popularity_ranks, probe_windows, proportion_interval, ratio_interval,
                                      recovery_counts, recovery_metrics, residual_metrics, sequences, title_forms)

TITLES = ["Seven (Se7en) (1995)", "Usual Suspects, The (1995)", "Toy Story (1995)", "Heat (1995)",
          "Good, The Bad and The Ugly, The (1966)", "Amélie (2001)", "Scream (1996)", "Scream 2 (1997)",
          "Schindler's List (1993)", "Cape Fear (1962)", "Cape Fear (1991)"]
RECOVERY = "This user has watched {titles} in the previous."


# ------------------------------------------------------------------------------------------- matching
def test_title_forms_fold_case_punctuation_article_alt_title_and_year():
    assert normalise("  Amélie, THE!  ") == "amelie the"
    assert normalise("Schindler's List") == "schindlers list"
    assert title_forms("Seven (Se7en) (1995)") == {"seven se7en 1995", "seven se7en", "seven 1995", "seven"}
    assert title_forms("Usual Suspects, The (1995)") == {"usual suspects the 1995", "usual suspects the",
                                                         "the usual suspects 1995", "the usual suspects"}
    assert title_forms("Heat") == {"heat"}


def test_titles_with_parentheses_are_counted_where_the_reference_regex_misses_them():
    matcher = TitleMatcher(TITLES)
    text = "This user has watched Seven (Se7en) (1995), Usual Suspects, The (1995), Toy Story in the previous."
    # the reference searched each raw title as a regular expression: "(Se7en)" is a group, so it never matches
    assert re.search("Seven (Se7en) (1995)", text) is None
    recovered, named = recovery_counts(matcher, [text], [(0, 1, 3)], RECOVERY)
    # Seven and The Usual Suspects are in the sequence; Toy Story is named but is not; Heat is not named
    assert recovered.tolist() == [2] and named.tolist() == [3]


def test_entries_join_comma_pieces_into_titles_and_keep_non_titles():
    matcher = TitleMatcher(TITLES)
    entries = matcher.entries("The Usual Suspects, Good, The Bad and The Ugly, The, Nonexistent Film, amelie 2001, "
                              "1. Scream 2, \"Schindlers List\"")
    assert [(name, items) for name, items in entries] == [
        ("The Usual Suspects", {1}), ("Good, The Bad and The Ugly, The", {4}), ("Nonexistent Film", set()),
        ("amelie 2001", {5}), ("Scream 2", {7}), ("Schindlers List", {8})]
    # an exact title only: "Scream 2" is not "Scream"; a title shared by two items names both
    assert matcher.items_named("Scream") == {6}
    assert matcher.items_named("Cape Fear") == {9, 10}
    assert matcher.items_named("Cape Fear (1991)") == {10}


def test_recovery_counts_distinct_sequence_items_and_precision_counts_repeats():
    matcher = TitleMatcher(TITLES)
    texts = [RECOVERY.format(titles="Heat, Heat, Heat, Toy Story"),  # one of the sequence, named 4 times
             "Scream 2\nSeven\nsomething else",  # a list over lines, without the answer's frame
             ""]
    seqs = [(3, 0, 1), (6, 0, 2), (0, 1, 2)]
    recovered, named = recovery_counts(matcher, texts, seqs, RECOVERY)
    assert recovered.tolist() == [1, 1, 0] and named.tolist() == [4, 3, 0]
    metrics = recovery_metrics(recovered, named, 3)
    assert metrics["recovery_mean"] == pytest.approx(2 / 3)
    assert metrics["recovery_precision"] == pytest.approx(2 / 7)
    assert metrics["recovery_dist"] == pytest.approx([1 / 3, 2 / 3, 0, 0])


def test_extract_answer_reads_the_name_between_the_answer_frame():
    template = "This user watched movie {title} in List2 but not in List1."
    assert extract_answer("This user watched movie Seven (Se7en) in List2 but not in List1.", template,
                          "title") == "Seven (Se7en)"
    assert extract_answer('"Heat"\nmore text', template, "title") == "Heat"
    assert extract_answer("this user watched movie Toy Story", template, "title") == "Toy Story"


def test_residual_and_popularity_ranks():
    metrics = residual_metrics(np.array([0, 3, 7, 0.5]))
    assert metrics["residual_top1"] == pytest.approx(0.5) and metrics["residual_top5"] == pytest.approx(0.75)
    assert metrics["hr@10"] == 1.0
    assert "hr@10" not in residual_metrics(np.array([0]), "_pop")
    popularity = np.array([5, 9, 1, 7])
    # item 1 is the most popular but excluded (in List1): item 3 comes first, item 0 second
    ranks = popularity_ranks(popularity, [3, 0, 2], [(1,), (1,), ()])
    assert ranks.tolist() == [0, 1, 3]


def test_other_user_rows_never_pick_the_same_user():
    rows = other_user_rows([4, 4, 5, 4, 6])
    assert rows.tolist() == [2, 2, 3, 4, 0]
    assert other_user_rows([1, 1]).tolist() == [0, 1]


def test_bootstrap_interval_brackets_the_mean():
    values = np.r_[np.ones(30), np.zeros(70)]
    low, high = bootstrap_interval(values, draws=500)
    assert low < 0.3 < high and high - low < 0.25
    assert bootstrap_interval(np.zeros(5)) == [0.0, 0.0]


def test_proportion_interval_is_wilsons_and_not_empty_at_zero_hits():
    # Wilson at 0 of n: [0, z^2 / (n + z^2)]; z = 1.959964 -> 3.841459 / 53.841459 for n = 50
    low, high = proportion_interval(np.zeros(50, bool))
    assert low == 0.0 and high == pytest.approx(3.841459 / 53.841459, abs=1e-5)
    # 5 of 50: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z2, n, p = 3.841459, 50, 0.1
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), (z2 * (p * (1 - p) / n + z2 / (4 * n * n))) ** 0.5 / (1 + z2 / n)
    assert proportion_interval(np.r_[np.ones(5), np.zeros(45)] > 0) == pytest.approx([centre - half, centre + half],
                                                                                  abs=1e-5)


def test_ratio_interval_resamples_cases_of_a_sum_ratio():
    recovered, named = np.array([2, 0, 1, 3, 0, 1, 2, 0, 1, 2]), np.array([4, 2, 2, 4, 1, 2, 4, 3, 2, 4])
    low, high = ratio_interval(recovered, named, draws=500)
    assert low < recovered.sum() / named.sum() < high and 0 <= low and high <= 1  # 12 / 28
    assert ratio_interval(np.zeros(6), np.full(6, 10)) == [0.0, 0.0]


# ------------------------------------------------------------------------------------------- windows
def dataset(per_user: dict[str, int]):
    rows, t = [], 0
    for user, n in per_user.items():
        for i in range(n):
            rows.append((user, f"i{i}", 4, t))
            t += 1
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(max(per_user.values()))],
                          "title": [f"T{i}" for i in range(max(per_user.values()))]})
    return build_dataset("hand", pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]), items)


def test_windows_hold_L_items_and_are_split_by_the_last_items_time():
    ds = dataset({"a": 6, "b": 4})
    cfg = {"length": 3, "split": [0.5, 0.25, 0.25], "train_size": 0, "valid_size": 0, "test_size": 0,
           "subset_seed": 0}
    windows = probe_windows(ds, cfg, seed=0)
    # a: windows ending at positions 2..5 (4), b: 2..3 (2); by the last item's time: a's 4 first, then b's
    assert [len(windows[k]) for k in ("train", "valid", "test")] == [3, 1, 2]
    item = {r: i for i, r in enumerate(ds.items["raw_id"])}
    assert sequences(windows["train"])[0] == (item["i0"], item["i1"], item["i2"])
    assert windows["cutoff"] == 4
    with pytest.raises(InputError, match=r"samples.length=7: no user .* has that many interactions \(the longest "
                                         r"history has 6\)"):
        probe_windows(ds, {**cfg, "length": 7}, seed=0)


# ------------------------------------------------------------------------------------------- projector
@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny-random")
    return Backbone(tiny_llama(tokenizer), tokenizer)


def test_projector_conv_pools_positions_then_projects():
    torch.manual_seed(0)
    projector = SeqProjector(positions=3, state_dim=4, hidden_size=8, tokens=2)
    states = torch.randn(5, 3, 4)
    out = projector(states)
    assert out.shape == (5, 2, 8)
    weights = projector.conv.weight[:, 0, :, 0]  # [k, L]
    pooled = torch.einsum("kl,bld->bkd", weights, states) + projector.conv.bias.view(1, -1, 1)
    assert torch.allclose(out, projector.linear(pooled), atol=1e-6)
    assert SeqProjector(3, 4, 8, 2, "last")(states).shape == (5, 2, 8)
    with pytest.raises(InputError, match="projector.pooling"):
        SeqProjector(3, 4, 8, 1, "max")
    with pytest.raises(InputError, match=r"expected hidden states \[B, 3, d\]"):
        projector(torch.randn(5, 2, 4))


def test_soft_token_reaches_the_input_embeddings_at_the_placeholder_and_only_the_projector_learns(tiny):
    backbone = tiny
    torch.manual_seed(0)
    projector = SeqProjector(4, 6, backbone.hidden_size)
    states = torch.randn(2, 4, 6)
    prompts = ["Items:<SeqH>. Name them.", "A longer prompt, left padded:<SeqH>. Name them."]
    captured = {}
    layer = backbone.causal_lm.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: captured.update(x=kwargs.get("hidden_states", args[0] if args else None)),
                                             with_kwargs=True)
    try:
        loss, _ = backbone.lm_loss(prompts, ["T1, T2", "T3"], slots={"<SeqH>": projector(states)})
    finally:
        handle.remove()
    enc = backbone.encode(prompts, ["T1, T2", "T3"], slot_k={"<SeqH>": 1})
    positions = enc.slot_positions["<SeqH>"][:, 0]
    embeds = captured["x"]
    expected = projector(states)[:, 0]
    for row in range(2):
        assert torch.allclose(embeds[row, positions[row]], expected[row], atol=1e-6)
        # every other real position holds its token's embedding
        other = [p for p in range(enc.input_ids.shape[1]) if p != positions[row] and enc.attention_mask[row, p]]
        assert torch.allclose(embeds[row, other], backbone.input_embeddings()(enc.input_ids[row, other]), atol=1e-6)
    # the placeholder sits right after "Items:" / "padded:" in each row (left padding shifts the short row)
    assert backbone.tokenizer.decode(enc.input_ids[0, positions[0] - 1]).strip() == ":"
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())

    # train_slot_modules: the projector moves, every LLM weight stays as it was
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    proj_before = {k: v.clone() for k, v in projector.state_dict().items()}

    class Store(dict):
        def save_checkpoint(self, name, state):
            self[name] = state

        def load_checkpoint(self, name):
            return None

    answers = ["T1, T2", "T3"]
    train_slot_modules(Store(), backbone, projector, TrainConfig(epochs=2, batch_size=2, lr=1e-2, patience=0), 2,
                       lambda batch: backbone.lm_loss([prompts[i] for i in batch], [answers[i] for i in batch],
                                                      slots={"<SeqH>": projector(states[batch])}),
                       lambda: 0.0, "p")
    assert all(torch.equal(before[k], v) for k, v in backbone.model.state_dict().items())
    assert any(not torch.equal(proj_before[k], v) for k, v in projector.state_dict().items())


# ------------------------------------------------------------------------------------------- config / run
def run_args(small, out, *extra):
    from recalign.methods.recinterpreter import SMOKE

    sets = [f"{k}={json.dumps(v)}" for k, v in SMOKE.items()] + list(extra)
    return small, out, sets


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from recalign import assets

    source = assets.fetch("ml-100k")
    out = tmp_path_factory.mktemp("small")
    lines = (source / "ml-100k.inter").read_text().splitlines()
    rows = [line for line in lines[1:] if int(line.split("\t")[0]) <= 40]
    (out / "small.inter").write_text("\n".join([lines[0], *rows]) + "\n")
    (out / "small.item").write_text((source / "ml-100k.item").read_text())
    return str(out / "small.inter")


@pytest.mark.parametrize("sets, message", [
    (["encoder.model=mf"], "encoder.model: mf is not a sequential recommender"),
    (["encoder.params={max_len: 3}"], r"samples.length=4 is larger than the encoder's encoder.params.max_len=3"),
    (["encoder.params={depth: 3}"], "encoder.params: unknown sasrec parameter"),
    (["samples.length=1"], "samples.length: expected an integer >= 2"),
    (["probes=[recovery, summary]"], "probes: expected a non-empty list"),
    (["prompt.residual.instruction='List2: <SeqH2>'"], "prompt.residual: the template must contain <SeqH1> exactly once"),
    (["prompt.recovery.answer='Watched.'"], r"prompt.recovery.answer: must contain \{titles\} exactly once"),
    (["samples.length=2000"], "samples.length=2000: no user"),
])
def test_bad_config_is_one_line_naming_the_key(small, tmp_path, sets, message):
    from recalign.runner import run_method

    args = run_args(small, tmp_path / "run", *sets, f"grounding.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(InputError, match=message):
        run_method("recinterpreter", args[0], args[1], sets=args[2])
    assert not (tmp_path / "run").exists()


def test_run_reports_every_probe_and_control_on_the_same_windows(small, tmp_path):
    from recalign.runner import run_method

    args = run_args(small, tmp_path / "run", "projector.tokens=2", "lora.tune=true",
                    f"grounding.cache_dir={tmp_path / 'cache'}")
    metrics = run_method("recinterpreter", *args[:2], sets=args[2])
    test = metrics["test"]
    for suffix in ("", "_random", "_shuffled", "_text", "_pop"):
        assert {f"recovery_mean{suffix}", f"recovery_precision{suffix}", f"residual_top1{suffix}",
                f"residual_top5{suffix}"} <= set(test)
    assert 0 <= test["residual_top1"] <= test["residual_top5"] <= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(saved["recovery_distribution"]["recovery_dist"]) == 5  # k = 0..L with L = 4
    assert saved["training"]["recovery"]["steps"] == 2 and saved["samples"]["test_windows"] == 6
    cases = json.loads((tmp_path / "run" / "cases-test.json").read_text())
    assert len(cases) == 6 and len(cases[0]["sequence"]) == 4
    assert "Probes on 6 test windows" in (tmp_path / "run" / "report.md").read_text()


def test_a_one_item_answer_names_its_title_inside_the_frame_or_in_quotes():
    from recalign.tasks.interpret import named_item_text

    matcher = TitleMatcher(TITLES)
    template = "This user watched movie {title} in List2 but not in List1."
    assert named_item_text(matcher, "This user watched movie Heat in List2 but not in List1.", template, "title") == "Heat"
    assert named_item_text(matcher, 'The movie in List2 is "Seven (Se7en)", not in List1.', template,
                           "title") == "Seven (Se7en)"
    assert named_item_text(matcher, "This user watched movie Big Fish in List2 but not in List1.", template,
                           "title") == "Big Fish"


def test_quoted_titles_inside_prose_are_found():
    matcher = TitleMatcher(TITLES)
    text = ' a list, which can be represented as: "Usual Suspects, The", "Seven (Se7en)" and more'
    entries = matcher.entries(text)
    assert [items for _, items in entries if items] == [{1}, {0}]
    assert [name for name, items in entries if not items] == ["a list", "which can be represented as:", "more"]


def test_a_catalogue_of_five_items_warns_that_the_residual_top5_holds_it_all():
    from recalign.methods import get_method
    from recalign.runner import dataset_warnings

    spec = get_method("recinterpreter")
    assert any("5 items, not more than k=5" in w for w in dataset_warnings(spec, {}, dataset({"a": 5, "b": 5})))
    assert dataset_warnings(spec, {}, dataset({"a": 6, "b": 4})) == []
