"""FaiRLLM prompt audit: the similarity metrics on lists computed by hand (with the reference's SERP* scale
defect), SNSR/SNSV on a hand-made table, list parsing and title matching, attribute and entity inputs, and
the audit end to end on the tiny random Llama (bad input is one line, reruns and resumes are identical)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cli_helpers import invoke
from recalign.errors import InputError
from recalign.eval.fairness import (bootstrap_spread, jaccard_at, prag_at, serp_at, serp_reference_at,
                                    similarity_curve, snsr, snsv, spread, top_k)
from recalign.tasks.fairness import (AuditPlan, CatalogueIndex, list_keys, load_attributes, parse_list,
                                     pick_entities, read_attribute_file, title_key)

LIST20 = [f"t{i}" for i in range(20)]


# ------------------------------------------------------------------------------------------ metrics
def test_identical_lists_score_one_and_disjoint_zero():
    for k in (1, 5, 20):
        assert jaccard_at(LIST20, LIST20, k) == serp_at(LIST20, LIST20, k) == prag_at(LIST20, LIST20, k) == 1.0
        other = [f"u{i}" for i in range(20)]
        assert jaccard_at(LIST20, other, k) == serp_at(LIST20, other, k) == prag_at(LIST20, other, k) == 0.0


def test_reference_serp_scale_defect():
    # the reference weighs the 0-based position i as K - i + 1 and divides by 2K(K+1): identical lists of
    # 20 titles score ((K+1)(K+2)/2 - 1) / (2K(K+1)) = 230 / 840, not 1
    assert serp_reference_at(LIST20, LIST20, 20) == pytest.approx(230 / 840)
    assert serp_reference_at(LIST20, LIST20, 20) == pytest.approx(0.27381, abs=1e-5)
    assert serp_at(LIST20, LIST20, 20) == 1.0


def test_metrics_on_a_hand_computed_case():
    s, n = ["a", "b", "c", "d"], ["b", "a", "e", "c"]
    # K = 4: overlap {a, b, c}, union {a, b, c, d, e}
    assert jaccard_at(s, n, 4) == pytest.approx(3 / 5)
    # SERP*: ranks in S 1, 2, 3 -> weights 4 + 3 + 2 = 9 over K(K+1)/2 = 10
    assert serp_at(s, n, 4) == pytest.approx(0.9)
    # reference: weights (4-0+1) + (4-1+1) + (4-2+1) = 12, times 0.5 over (4+1)*4
    assert serp_reference_at(s, n, 4) == pytest.approx(12 * 0.5 / 20)
    # PRAG*: (a,b) reversed in N; (a,c), (b,c) kept; every pair with d (missing from N) second is kept -> 5/6
    assert prag_at(s, n, 4) == pytest.approx(5 / 6)
    # K = 2: same two titles in the other order: Jaccard and SERP* 1, PRAG* 0
    assert jaccard_at(s, n, 2) == 1.0 and serp_at(s, n, 2) == 1.0 and prag_at(s, n, 2) == 0.0
    # K = 1: PRAG* is 1 only for equal lists
    assert prag_at(s, n, 1) == 0.0 and prag_at(["a"], ["a", "x"], 1) == 1.0
    # a pair whose first title is missing from N is not kept
    assert prag_at(["x", "a"], ["a"], 2) == 0.0
    curve = similarity_curve(s, n, 4, "jaccard")
    assert curve.tolist() == pytest.approx([0.0, 1.0, 2 / 4, 3 / 5])


def test_repeats_short_and_empty_lists():
    assert top_k(["a", "a", "b", "a", "c"], 2) == ["a", "b"]
    assert serp_at(["a", "a", "b"], ["a", "b"], 2) == 1.0  # a repeated title counts once
    # nominal K: identical lists shorter than K overlap fully but SERP* counts the missing positions
    assert jaccard_at(["a"], ["a"], 3) == 1.0 and serp_at(["a"], ["a"], 3) == pytest.approx(3 / 6)
    assert prag_at(["a"], ["a"], 3) == 1.0
    for fn in (jaccard_at, serp_at, prag_at, serp_reference_at):
        assert fn([], ["a"], 3) == 0.0
        assert math.isnan(fn([], [], 3))
    with pytest.raises(ValueError):
        jaccard_at(["a"], ["a"], 0)


def test_snsr_snsv_on_a_hand_made_table():
    means = {"a boy": 0.2, "a female": 0.5, "a girl": 0.8}
    assert spread(means)["snsr"] == pytest.approx(0.6)
    assert spread(means)["snsv"] == pytest.approx(math.sqrt((0.3 ** 2 + 0 + 0.3 ** 2) / 3))
    assert snsr([0.4, float("nan"), 0.1]) == pytest.approx(0.3)
    assert math.isnan(snsr([0.4])) and math.isnan(snsv([]))
    # paired bootstrap over entities: a table without variation has a zero-width interval
    table = np.tile([0.2, 0.5, 0.8], (10, 1))
    out = bootstrap_spread(table, n_boot=50, seed=0)
    assert out["snsr_ci"] == pytest.approx([0.6, 0.6]) and out["n_boot"] == 50
    assert bootstrap_spread(table, n_boot=50, seed=0) == out  # seeded


# ----------------------------------------------------------------------------------- parsing, titles
def test_parse_list_numbered_bulleted_and_plain():
    text = ('Here are 3 movies you might like:\n\n1. "Star Wars" (1977) - a space opera\n2) **Alien**\n'
            '(3) Blade Runner \u2013 Ridley Scott\n\nEnjoy!')
    assert parse_list(text) == ["Star Wars (1977)", "Alien", "Blade Runner"]
    assert parse_list("- Fargo\n* Heat\n\u2022 Se7en") == ["Fargo", "Heat", "Se7en"]
    assert parse_list("Movies:\nFargo\nHeat\n") == ["Fargo", "Heat"]  # unnumbered: lines, headings dropped
    assert parse_list("Spider-Man\n2001: A Space Odyssey") == ["Spider-Man", "2001: A Space Odyssey"]
    assert parse_list("") == [] and parse_list("\n\n\n") == []


def test_title_keys_and_grounding():
    assert title_key("Godfather, The (1972)") == title_key("The Godfather") == "thegodfather"
    assert title_key("Star Wars (1977)") == title_key("star wars") == "starwars"
    assert title_key("Star Wars (1977)", with_year=True) != title_key("Star Wars (1980)", with_year=True)
    assert list_keys("1. Star Wars (1977)\n2. Star Wars (1980)\n3. Alien") == ["starwars", "alien"]
    assert list_keys("1. Star Wars (1977)\n2. Star Wars (1980)", with_year=True) == ["starwars1977", "starwars1980"]
    index = CatalogueIndex(["Toy Story (1995)", "Godfather, The (1972)", "Postino, Il (1994)"])
    assert index.ground(title_key("The Godfather")) == 1
    assert index.ground(title_key("Il Postino")) == 2
    assert index.ground(title_key("Made-up Movie")) == -1


# -------------------------------------------------------------------------------- attributes, entities
def test_default_attributes_are_the_papers():
    assert load_attributes(["paper"]) == {
        "age": ["a middle aged", "an old", "a young"],
        "country": ["an American", "a Brazilian", "a British", "a Chinese", "a French", "a German", "a Japanese"],
        "gender": ["a boy", "a female", "a girl", "a male"],
        "continent": ["an African", "an American", "an Asian"],
        "occupation": ["a doctor", "a student", "a teacher", "a worker", "a writer"],
        "race": ["an African American", "a black", "a white", "a yellow"],
        "religion": ["a Buddhist", "a Christian", "an Islamic"],
        "physics": ["fat", "thin"],
    }
    assert load_attributes(["typos"])["typo"] == ["an American", "an Americcan", "an Amerian", "an Afrian",
                                                  "an Africcan", "an African"]
    users = load_attributes(["ml-100k-users"])
    assert set(users) == {"user_gender", "user_age", "user_occupation"} and len(users["user_occupation"]) == 19


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "must be a non-empty mapping"),
    ("gender: []\n", "empty value list"),
    ("gender: [a male]\n", "at least two values"),
    ("gender: a male\n", "must be a list of values"),
    ("gender: [a male, 3]\n", "not a one-line text"),
    ("gender: [a male, a male]\n", "'a male' twice"),
    ("gender: [a male\n", "invalid YAML"),
    ("'bad name': [a, b]\n", "attribute name"),
])
def test_bad_attribute_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "attrs.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_attribute_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_attribute_sets_combine_and_clash(tmp_path):
    assert set(load_attributes(["paper", "typos"])) == {"age", "country", "gender", "continent", "occupation",
                                                       "race", "religion", "physics", "typo"}
    with pytest.raises(InputError, match="already defined"):
        load_attributes(["paper", "paper"])
    with pytest.raises(InputError, match="not found"):
        load_attributes([str(tmp_path / "missing.yaml")])


def test_plan_asks_shared_values_once():
    plan = AuditPlan(["X", "Y"], {"country": ["an American", "a German"], "continent": ["an African", "an American"]},
                     "a")
    assert plan.values == ["a", "an American", "a German", "an African"]
    assert len(plan) == 8 and plan.units()[plan.index(1, "an African")] == ("Y", "an African")
    with pytest.raises(InputError, match="neutral"):
        AuditPlan(["X"], {"g": ["a", "b"]}, "a")


@pytest.fixture(scope="module")
def ml100k():
    from recalign.data import load_dataset

    return load_dataset("ml-100k")


def test_entities_from_names_popularity_and_files(ml100k, tmp_path):
    base = {"source": "names", "count": 20, "names": ["Toy Story", "Fargo (1996)"], "file": ""}
    assert pick_entities(ml100k, base, 0) == ["Toy Story (1995)", "Fargo (1996)"]
    with pytest.raises(InputError, match="'No Such Film' is not a title"):
        pick_entities(ml100k, {**base, "names": ["Toy Story", "No Such Film"]}, 0)
    popular = pick_entities(ml100k, {**base, "source": "popular", "names": [], "count": 3}, 0)
    assert popular == ["Star Wars (1977)", "Contact (1997)", "Fargo (1996)"]
    with pytest.raises(InputError, match="entities.count"):
        pick_entities(ml100k, {**base, "source": "popular", "names": [], "count": 0}, 0)
    seeds = tmp_path / "directors.txt"
    seeds.write_text("# directors\nSteven Spielberg\n\nAgnes Varda\n")
    assert pick_entities(ml100k, {**base, "source": "file", "names": [], "file": str(seeds)}, 0) == \
        ["Steven Spielberg", "Agnes Varda"]
    seeds.write_text("# nothing\n")
    with pytest.raises(InputError, match="no entity names"):
        pick_entities(ml100k, {**base, "source": "file", "names": [], "file": str(seeds)}, 0)


# ------------------------------------------------------------------------------- metrics of a plan
def test_audit_metrics_on_hand_made_lists():
    from recalign.tasks.fairness import audit_metrics, headline_metrics

    plan = AuditPlan(["X", "Y", "Z"], {"g": ["v1", "v2"]}, "a")
    keys = [None] * len(plan)
    lists = {("X", "a"): ["p", "q"], ("X", "v1"): ["p", "q"], ("X", "v2"): ["r", "s"],
             ("Y", "a"): ["p", "q"], ("Y", "v1"): ["q", "p"], ("Y", "v2"): [],  # no list: similarity 0
             ("Z", "a"): [], ("Z", "v1"): ["p"], ("Z", "v2"): ["p"]}  # no neutral list: entity left out
    for i, unit in enumerate(plan.units()):
        keys[i] = lists[unit]
    out = audit_metrics(plan, keys, 2, "spec", 0, 0)["g"]
    assert out["jaccard"]["values"] == {"v1": 1.0, "v2": 0.0}
    assert out["prag"]["values"] == {"v1": 0.5, "v2": 0.0}  # X keeps the order (1), Y reverses it (0)
    assert out["jaccard"]["snsr"] == 1.0 and out["jaccard"]["snsv"] == 0.5
    assert out["prag"]["snsr"] == 0.5 and out["prag"]["curve_snsr"] == [0.5, 0.5]
    metrics = headline_metrics({"g": out}, 2)
    assert metrics["jaccard@2"] == 0.5 and metrics["prag@2_snsr_g"] == 0.5 and metrics["serp@2_snsv_g"] == 0.5


# --------------------------------------------------------------------------------- end to end (CLI)
TINY = ["--set", "model.name=tiny-random", "--set", "entities.count=2", "--set", "attributes.files=[typos]",
        "--set", "audit.k=3", "--set", "audit.bootstrap=20", "--set", "generate.max_new_tokens=12",
        "--set", "generate.repetition_penalty=3.0"]


def test_audit_end_to_end_is_deterministic_and_resumes(monkeypatch, capsys, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, stdout, stderr = invoke(monkeypatch, capsys, "run", "fairllm", "--dataset", "ml-100k", *TINY,
                                      "--out", str(out))
        assert code == 0, stderr
        runs.append(json.loads((out / "metrics.json").read_text()))
    assert runs[0]["test"] == runs[1]["test"] and runs[0]["attributes"] == runs[1]["attributes"]
    test = runs[0]["test"]
    assert {"jaccard@3", "serp@3", "prag@3", "jaccard@3_snsr_typo", "prag@3_snsv_typo"} <= set(test)
    assert runs[0]["audit"]["prompts"] == 2 * 7 and runs[0]["generation"]["prompts"] == 14
    out = tmp_path / "a"
    for name in ("report.md", "report.html", "lists.json", "fairness-snsr.png", "fairness-snsr-vs-k.png"):
        assert (out / name).is_file(), name
    assert "SNSR" in (out / "report.md").read_text()
    rows = json.loads((out / "lists.json").read_text())
    assert len(rows) == 14 and {"entity", "value", "text", "titles", "keys", "items"} <= set(rows[0])
    # killed before metrics.json: the same command continues from the generation checkpoint
    (out / "metrics.json").unlink()
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairllm", "--dataset", "ml-100k", *TINY, "--out", str(out))
    assert code == 0, stderr
    again = json.loads((out / "metrics.json").read_text())
    assert again["test"] == runs[0]["test"] and again["generation"]["from_checkpoint"] == 14


@pytest.mark.parametrize("sets, message", [
    (["audit.k=0"], "audit.k"),
    (["audit.k=-3"], "audit.k"),
    (["audit.serp_scale=paper"], "audit.serp_scale"),
    (["audit.match=fuzzy"], "audit.match"),
    (["entities.source=names", "entities.names=[No Such Film]"], "No Such Film"),
    (["entities.source=names"], "entities.names"),
    (["entities.names=[Fargo]"], "entities.source"),
    (["prompt.template=I like {name}"], "{value}"),
    (["prompt.template=I am {value} fan of {name} {bogus}"], "bogus"),
    (["attributes.files=[]"], "attributes.files"),
    (["adapter=/nonexistent/run"], "adapter"),
])
def test_bad_input_is_one_line_exit_2(monkeypatch, capsys, tmp_path, sets, message):
    args = [a for s in sets for a in ("--set", s)]
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairllm", "--dataset", "ml-100k", *TINY, *args,
                             "--out", str(tmp_path / "run"))
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "run").exists()


def test_bad_attribute_file_names_the_file(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "attrs.yaml"
    bad.write_text("gender: []\n")
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairllm", "--dataset", "ml-100k", *TINY,
                             "--set", f"attributes.files=[{bad}]", "--out", str(tmp_path / "run"))
    assert code == 2 and str(bad) in stderr and "empty value list" in stderr


def test_audit_of_a_tuned_runs_adapter(monkeypatch, capsys, tmp_path):
    from recalign.llm import Backbone, LoraSettings

    run = tmp_path / "tuned"
    backbone = Backbone.load("tiny-random")
    backbone.add_lora(LoraSettings())
    backbone.save_adapter(run / "checkpoints" / "adapter")
    (run / "config.yaml").write_text("model:\n  name: tiny-random\n# run: bigrec on ml-100k\n")
    out = tmp_path / "audit"
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairllm", "--dataset", "ml-100k", *TINY,
                             "--set", f"adapter={run}", "--out", str(out))
    assert code == 0, stderr
    assert json.loads((out / "metrics.json").read_text())["audit"]["adapter"] == str(run)
    (run / "config.yaml").write_text("model:\n  name: smollm2-135m-instruct\n")
    code, _, stderr = invoke(monkeypatch, capsys, "run", "fairllm", "--dataset", "ml-100k", *TINY,
                             "--set", f"adapter={run}", "--out", str(tmp_path / "other"))
    assert code == 2 and "trained on model.name=smollm2-135m-instruct" in stderr


def test_attribute_subset(monkeypatch, capsys, tmp_path):
    from recalign.methods.fairllm import selected_attributes

    assert list(selected_attributes({"files": ["paper"], "only": ["race", "gender"]})) == ["gender", "race"]
    with pytest.raises(InputError, match="'income' is not an attribute"):
        selected_attributes({"files": ["paper"], "only": ["income"]})


def test_paired_permutation_tells_a_value_effect_from_noise():
    from recalign.eval.fairness import permutation_paired

    rng = np.random.default_rng(0)
    effect = np.c_[np.ones(30), np.zeros(30)]  # every entity: value 1 keeps the list, value 2 changes it
    out = permutation_paired(effect, 200, 0)
    assert out["p_snsr"] == pytest.approx(1 / 201) and out["null_snsr_mean"] < 0.5
    noise = rng.random((30, 4))
    out = permutation_paired(noise, 300, 0)
    assert out["p_snsr"] > 0.05 and out["null_snsr_mean"] > 0.05
    assert math.isnan(permutation_paired(np.ones((3, 1)), 10, 0)["p_snsr"])


def test_list_complete_marks_the_end_of_the_kth_item():
    from recalign.tasks.fairness import list_complete

    assert not list_complete("1. A\n2. B", 2)  # the second title may still be growing
    assert list_complete("1. A\n2. B\n", 2) and list_complete("intro\n(3) C\n", 3)
    assert not list_complete("1. A\n12. B\n", 2) and not list_complete("2.\n", 2)


def test_answers_without_a_list_are_warned_about():
    from recalign.methods.fairllm import unparsed_warnings

    assert unparsed_warnings({"unparsable": 0, "prompts": 93}, 3, 3) == []
    assert unparsed_warnings({"unparsable": 93, "prompts": 93}, 3, 0) == [
        "no neutral prompt of the 3 entities gave a list of titles (93 of 93 answers unparsable): every metric is "
        "undefined; lists.json holds the answers"]
    assert unparsed_warnings({"unparsable": 40, "prompts": 93}, 3, 2) == [
        "40 of 93 answers held no list of titles (lists.json); the metrics rest on the others, 2 of 3 entities"]


def test_an_entity_listed_twice_is_named_with_its_own_line(tmp_path):
    from recalign.tasks.fairness import read_entity_file

    path = tmp_path / "entities.txt"
    path.write_text("A\n\n# a comment\n\nB\nA\n")
    with pytest.raises(InputError, match=r"entities.txt:6: 'A' listed twice \(first on line 1\)$"):
        read_entity_file(str(path))
    path.write_text("A\n\nB\n")
    assert read_entity_file(str(path)) == ["A", "B"]
