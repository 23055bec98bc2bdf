"""BIGRec: sample construction, prompts, histories, resumable generation, and the method end to end with a
tiny random Llama."""

import json
import math

import numpy as np
import pytest
from types import SimpleNamespace
import torch

from recalign.data import load_dataset
from recalign.errors import InputError
from recalign.eval.metrics import ndcg_per_case
from recalign.llm import Generation, load_tokenizer
from recalign.llm import generate_step
from recalign.methods import bigrec
from recalign.tasks.ctr import draw
from recalign.tasks.next_item import full_histories, generative_samples, history_mask
from recalign.runner import run_method
from recalign.runs import RunDir

KS = [1, 3, 5, 10, 20]


@pytest.fixture(scope="module")
def ds():
    return load_dataset("ml-100k")


def _samples_cfg(**overrides):
    return {**bigrec.DEFAULTS["samples"], **overrides}


@pytest.fixture(scope="module")
def built(ds):
    return generative_samples(ds, _samples_cfg(valid_size=50, test_size=70))


def test_samples_window_split_by_target_time(ds, built):
    split, valid, test = built
    assert len(valid) == 50 and len(test) == 70
    assert all(len(h) == 10 for h in split.train["history"])
    assert split.train["timestamp"].max() <= split.valid["timestamp"].min()
    assert split.valid["timestamp"].max() <= split.test["timestamp"].min()
    total = len(split.train) + len(split.valid) + len(split.test)
    assert total == int((ds.interactions.groupby("user").size() - 10).clip(lower=0).sum())
    # the same subset every time (fixed subset seed), and a different one with another seed
    assert draw(split.valid, 50, 0)["item"].tolist() == valid["item"].tolist()
    assert draw(split.valid, 50, 1)["item"].tolist() != valid["item"].tolist()
    assert len(draw(split.valid, 0, 0)) == len(split.valid)


def test_liked_targets_only(ds):
    split, _, _ = generative_samples(ds, _samples_cfg(targets="liked", valid_size=10, test_size=10))
    assert split.train["label"].all() and split.test["label"].all()
    with pytest.raises(InputError, match="samples.targets"):
        generative_samples(ds, _samples_cfg(targets="some"))


def test_full_histories_are_every_earlier_interaction(ds, built):
    test = built[2].head(5)
    histories = full_histories(ds, test)
    inter = ds.interactions
    for (user, position, window, target), history in zip(
            test[["user", "position", "history", "item"]].itertuples(index=False), histories):
        items = inter.loc[inter["user"] == user, "item"].to_numpy()
        assert history.tolist() == items[:position].tolist()
        assert tuple(history[-10:].tolist()) == tuple(window)
        assert items[position] == target
    mask = history_mask(histories, ds.n_items)
    assert mask.sum(1).tolist() == [len(set(h.tolist())) for h in histories]


def test_prompts_and_answers_from_templates(ds, built):
    tokenizer = load_tokenizer("tiny-random")
    test = built[2].head(3)
    prompt_cfg = {**bigrec.PROMPT, "wrapper": "alpaca"}
    backbone = SimpleNamespace(tokenizer=tokenizer, count_tokens=lambda t: len(tokenizer(t)["input_ids"]))
    prompts = bigrec.render_prompts(backbone, test, prompt_cfg, ds.titles(), "movie")
    titles = ds.titles()
    first = prompts[0]
    assert "### Instruction:\nGiven a list of movies the user has watched before" in first
    assert "The user has watched the following movies before: " + ", ".join(
        f'"{titles[i]}"' for i in test["history"][0]) in first
    answers = bigrec.render_answers(ds, test, prompt_cfg, tokenizer.eos_token)
    assert answers[0] == f'"{titles[test["item"][0]]}"' + tokenizer.eos_token
    assert tokenizer(answers[0], add_special_tokens=False)["input_ids"][-1] == tokenizer.eos_token_id
    assert bigrec.render_answers(ds, test, {**prompt_cfg, "append_eos": False}, "</s>")[0].endswith('"')
    # a token budget drops the oldest history items, never the instruction
    short = bigrec.render_prompts(backbone, test, {**prompt_cfg, "max_tokens": 120}, ds.titles(), "movie")
    assert len(tokenizer(short[0])["input_ids"]) <= 120 and f'"{titles[test["history"][0][-1]]}"' in short[0]
    with pytest.raises(InputError, match="prompt.input"):
        bigrec.render_prompts(backbone, test, {**prompt_cfg, "input": "{nope}"}, ds.titles(), "movie")


class _FakeBackbone:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, num_beams, max_new_tokens, batch_size=None):
        self.calls.append(list(prompts))
        return Generation([[f"{p}-{b}" for b in range(num_beams)] for p in prompts],
                          torch.zeros(len(prompts), num_beams), [[[]] * num_beams for _ in prompts])


def test_generation_is_checkpointed_and_resumes(tmp_path):
    run = RunDir(tmp_path, resume=True)
    prompts = [f"p{i}" for i in range(10)]
    backbone = _FakeBackbone()
    run.save_checkpoint("generations-test", {"texts": [["p0-0", "p0-1"], ["p1-0", "p1-1"], ["p2-0", "p2-1"]],
                                             "scores": [[0.0, 0.0]] * 3})
    state = generate_step(run, backbone, prompts, "test", beams=2, max_new_tokens=4, block=4)
    assert [c[0] for c in backbone.calls] == ["p3", "p7"]  # only what was missing, in blocks
    assert [row[0] for row in state["texts"]] == [f"p{i}-0" for i in range(10)]
    assert run.load_checkpoint("generations-test")["texts"] == state["texts"]
    backbone.calls.clear()
    generate_step(run, backbone, prompts, "test", beams=2, max_new_tokens=4, block=4)
    assert backbone.calls == []


def test_generation_stats():
    titles = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)"]
    texts = [['"Toy Story (1995)"', "x"], ["heat (1995)", "y"], ["Cassino", "z"]]
    stats = bigrec.generation_stats(texts, torch.tensor([0, 1, 2]), torch.tensor([1, 1, 2]), titles)
    assert stats["validity"] == pytest.approx(2 / 3)
    assert stats["in_catalogue"] == pytest.approx(2 / 3)
    assert stats["exact_target"] == pytest.approx(1 / 3)


TINY = ["model.name=tiny-random", "train.shots=16", "train.epochs=1", "train.valid_loss_size=8",
        "samples.valid_size=8", "samples.test_size=10", "generate.beams=2", "generate.max_new_tokens=6",
        "inject.cf_model=mf", "inject.cf_train.epochs=2", "inject.gammas=[0.0, 1.0, 8.0]"]


def test_bigrec_end_to_end_tiny_llama_and_resume(tmp_path):
    sets = TINY + [f"grounding.cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "run"
    metrics = run_method("bigrec", "ml-100k", out, sets=sets)
    for k in KS:
        for name in (f"ndcg@{k}", f"hr@{k}", f"ndcg@{k}_pop", f"hr@{k}_pop", f"ndcg@{k}_cf", f"hr@{k}_cf"):
            assert 0.0 <= metrics["test"][name] <= 1.0
        assert metrics["test"][f"ndcg@{k}"] <= metrics["test"][f"hr@{k}"] + 1e-12
    assert set(metrics["variants"]) == {"bigrec", "bigrec+pop", "bigrec+mf"}
    assert set(metrics["variants"]["bigrec+pop"]["gamma"]) == {f"{m}@{k}" for m in ("ndcg", "hr") for k in KS}
    for k in KS:  # every injected headline number carries its interval, at the gamma its metric chose
        lo, hi = metrics["test"][f"ndcg@{k}_pop_ci"]
        assert lo <= metrics["test"][f"ndcg@{k}_pop"] <= hi
        assert metrics["variants"]["bigrec+mf"]["test"][f"hr@{k}_ci"] == metrics["test"][f"hr@{k}_cf_ci"]
    assert set(metrics["paired"]) == {"bigrec+pop - pop alone", "bigrec+pop - bigrec", "bigrec - pop alone",
                                      "bigrec+mf - mf alone", "bigrec+mf - bigrec", "bigrec - mf alone"}
    assert metrics["generation"]["test"]["cases"] == 10  # every test case counted
    assert metrics["samples"]["shots"] == 16 and metrics["catalogue"]["items"] == 1682
    assert not metrics["catalogue"]["cached"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert (out / "checkpoints" / "adapter" / "adapter_config.json").is_file()
    assert "bigrec+pop" in (out / "report.md").read_text()
    cases = json.loads((out / "cases-test.json").read_text())
    assert len(cases) == 10 and {"rank", "rank_pop", "rank_cf", "valid_title", "generated"} <= set(cases[0])
    ranks = np.array([c["rank"] for c in cases])
    assert math.isclose(metrics["test"]["hr@10"], float((ranks < 10).mean()))
    injected = np.array([c["rank_cf"] for c in cases])
    with_cf = ndcg_per_case(injected, 10).mean() - ndcg_per_case(ranks, 10).mean()
    assert math.isclose(metrics["paired"]["bigrec+mf - bigrec"]["ndcg@10"], with_cf, abs_tol=1e-12)
    assert metrics["paired"]["bigrec+mf - bigrec"]["cases"] == 10

    # resume after losing the final metrics: nothing is retrained or regenerated, same numbers
    (out / "metrics.json").unlink()
    again = run_method("bigrec", "ml-100k", out, sets=sets, resume=True)
    assert again["test"] == metrics["test"]
    assert again["catalogue"]["cached"]
    assert "resumed training" in (out / "run.log").read_text()


def test_bad_config_is_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="grounding.beams"):
        run_method("bigrec", "ml-100k", tmp_path / "r", sets=["grounding.beams=sum"])
    with pytest.raises(InputError, match="inject.gammas"):
        run_method("bigrec", "ml-100k", tmp_path / "r", sets=["inject.gammas=[-1]"])
    with pytest.raises(InputError, match="inject.cf_model"):
        run_method("bigrec", "ml-100k", tmp_path / "r", sets=["inject.cf_model=nope"])
    with pytest.raises(InputError, match="generate.max_new_tokens must be >= 1"):
        run_method("bigrec", "ml-100k", tmp_path / "r", sets=["generate.max_new_tokens=0"])
    with pytest.raises(InputError, match=r"uses \{history\} or \{liked\} or \{disliked\}"):
        run_method("bigrec", "ml-100k", tmp_path / "r", sets=["prompt.input=Recommend a {noun}."])
    assert not (tmp_path / "r").exists()
