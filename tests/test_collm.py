"""CoLLM and Soft-Prompt: the CTR protocol, the CIE, slot injection, which weights each step trains,
end-to-end runs and resume on a tiny random Llama (real SmolLM2 tokenizer)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.eval.metrics import auc
from recalign.data import build_dataset
from recalign.errors import InputError
from recalign.llm import (CIE, Backbone, Prompter, Scorer, SoftPrompt, TrainConfig, lora_step, tiny_llama,
                          train_slot_modules)
from recalign.methods.collm import DEFAULTS, CoLLMSlots, step1_adapter
from recalign.tasks.ctr import COLLM_PROTOCOL as PROTOCOL_DEFAULTS
from recalign.tasks.ctr import bounded, collm_protocol, valid_auc
from recalign.tasks.ctr import ctr_report as warm_cold_metrics
from recalign.tasks.text import SAMPLE_FIELDS, frame_fields
from recalign.runner import run_method
from recalign.runs import RunDir

TINY_RUN = ["model.name=tiny-random", "data_protocol.max_train=16", "data_protocol.max_valid=12",
            "data_protocol.max_test_warm=12", "data_protocol.max_test_cold=12", "data_protocol.max_per_user=4",
            "cf.train.epochs=2", "step1.batch_size=4", "step1.grad_accum=1", "step2.batch_size=4",
            "step2.grad_accum=1"]


# ------------------------------------------------------------------------------------------ protocol
def hand_made():
    """Users a, b are active early (train period); c appears only late; item z only late.

    Timestamps 0..100; split by time 80/10/10 => train <= 80, valid (80, 90], test > 90."""
    rows = [
        ("a", "x", 5, 0), ("a", "y", 2, 10), ("a", "w", 4, 20), ("a", "y", 5, 92), ("a", "z", 5, 95),
        ("b", "x", 4, 5), ("b", "w", 1, 30), ("b", "x", 3, 85), ("b", "w", 5, 99),
        ("c", "x", 5, 91), ("c", "y", 1, 93), ("c", "w", 4, 100),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame({"item_id": ["w", "x", "y", "z"], "title": ["W", "X", "Y", "Z"]})
    return build_dataset("hand", frame, items)


def test_time_split_liked_history_and_warm_cold_on_hand_made_data():
    ds = hand_made()
    data = collm_protocol(ds, dict(PROTOCOL_DEFAULTS, max_valid=None, history_len=2), seed=0)
    user = {u: i for i, u in enumerate(ds.users["raw_id"])}
    item = {r: i for i, r in enumerate(ds.items["raw_id"])}
    # every interaction is a sample (empty histories included), cut on the time axis
    assert sorted(data.train_all["timestamp"]) == [0, 5, 10, 20, 30]
    assert list(data.valid_full["timestamp"]) == [85]
    assert sorted(data.test_full["timestamp"]) == [91, 92, 93, 95, 99, 100]
    test = data.test_full.set_index("timestamp")
    # history = the last 2 earlier LIKED items (rating > 3), oldest first
    assert test.loc[95, "history"] == (item["w"], item["y"])  # a liked x, w, y(92); y@10 was disliked
    assert test.loc[99, "history"] == (item["x"],)  # b: x@5 liked, w@30 and x@85 not
    assert test.loc[91, "history"] == ()
    # warm = user AND item seen in training samples
    expected = {91: False, 92: True, 93: False, 95: False, 99: True, 100: False}
    assert {t: bool(test.loc[t, "warm"]) for t in expected} == expected
    assert bool(test.loc[95, "warm_user"]) and not bool(test.loc[95, "warm_item"])  # z is new
    assert not bool(test.loc[91, "warm_user"]) and user["c"] == test.loc[91, "user"]


def test_bounded_sets_draw_warm_and_cold_separately_and_deterministically():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user": rng.integers(0, 30, 600), "timestamp": np.arange(600),
                          "label": rng.random(600) < 0.5, "warm": rng.random(600) < 0.2})
    out = bounded(frame, 40, 50, 5, seed=3)
    assert out["warm"].sum() == 40 and (~out["warm"]).sum() == 50
    assert out.groupby(["user", "warm"]).size().max() <= 5
    pd.testing.assert_frame_equal(out, bounded(frame, 40, 50, 5, seed=3))
    assert not out.equals(bounded(frame, 40, 50, 5, seed=4))


def test_warm_cold_metrics_match_the_metric_functions():
    from recalign.eval import auc

    frame = pd.DataFrame({"user": [0, 0, 1, 1, 2, 2], "label": [1, 0, 1, 0, 1, 0],
                          "warm": [True, True, True, True, False, False]})
    scores = [0.9, 0.1, 0.2, 0.8, 0.5, 0.4]
    m = warm_cold_metrics(frame, scores)
    assert m["auc_warm"] == auc([1, 0, 1, 0], [0.9, 0.1, 0.2, 0.8])
    assert m["uauc_warm"] == 0.5 and m["auc_cold"] == 1.0 and m["n_warm"] == 4 and m["n_cold"] == 2
    assert m["auc"] == auc(frame["label"], scores)


# ------------------------------------------------------------------------------------------ modules
def test_cie_architecture_and_shape():
    cie = CIE(8, 64, tokens=3, hidden_mult=10)
    layers = list(cie.net)
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (8, 80, 64 * 3)
    assert cie(torch.randn(5, 8)).shape == (5, 3, 64)


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return Backbone.load("tiny-random", batch_size=4)


def fresh(tiny: Backbone) -> Backbone:
    return Backbone(tiny_llama(tiny.tokenizer), tiny.tokenizer, batch_size=4)


class FakeCF(torch.nn.Module):
    """Stands in for a CF model: query_embedding / item_embeddings like recalign.cf models."""

    name, max_len = "fake", None

    def __init__(self, n_users=4, n_items=4, d=6):
        super().__init__()
        self.n_items = n_items
        self.user = torch.nn.Embedding(n_users, d)
        self.item = torch.nn.Embedding(n_items, d)

    def query_embedding(self, query):
        return self.user(query.users)

    def item_embeddings(self):
        return self.item.weight


def sample_frame(n=6):
    return pd.DataFrame({"user": [i % 4 for i in range(n)], "item": [(i + 1) % 4 for i in range(n)],
                         "history": [tuple(range(i % 3)) for i in range(n)], "label": [i % 2 == 0 for i in range(n)],
                         "timestamp": range(n), "warm": [True] * n})


def prompters(backbone):
    p = DEFAULTS["prompt"]
    titles = ["Star Wars (1977)", "Toy Story (1995)", "Fargo (1996)", "Heat (1995)"]
    text = Prompter(p["text"], backbone.tokenizer, forbid=("<UserID>", "<TargetItemID>"))
    ids = Prompter(p["ids"], backbone.tokenizer, require=("<UserID>", "<TargetItemID>"))

    def render(prompter):
        return lambda frame: prompter.render_all(frame_fields(frame, titles, "movie", quote_target=False,
                                                              empty_history="none"))
    return render(text), render(ids)


def test_slots_receive_exactly_the_cie_outputs(tiny):
    backbone = fresh(tiny)
    torch.manual_seed(0)
    cf, cie = FakeCF(), CIE(6, backbone.hidden_size, tokens=2)
    slots = CoLLMSlots(cf, cie, "<UserID>", "<TargetItemID>", tune_cf=False)
    frame = sample_frame(3)
    _, ids_prompter = prompters(backbone)
    prompts = ids_prompter(frame)
    fills = slots(frame)
    captured = {}

    def grab(module, args, kwargs):  # the first decoder layer's input = the input embeddings
        captured["x"] = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).detach().clone()

    layer = backbone.causal_lm.model.layers[0]
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        backbone.yes_no_logits(prompts, slots=fills)
    finally:
        handle.remove()
    enc = backbone.encode(prompts, slot_k={"<UserID>": 2, "<TargetItemID>": 2})
    x = captured["x"]
    with torch.no_grad():
        users, items = cf.query_embedding(SimpleNamespace(users=torch.tensor(frame["user"].to_numpy()))), \
            cf.item_embeddings()[torch.tensor(frame["item"].to_numpy())]
        expected_user, expected_item = cie(users), cie(items)
    table = backbone.input_embeddings().weight
    for row in range(len(prompts)):
        upos, ipos = enc.slot_positions["<UserID>"][row], enc.slot_positions["<TargetItemID>"][row]
        assert torch.equal(x[row, upos], expected_user[row])
        assert torch.equal(x[row, ipos], expected_item[row])
        others = [p for p in range(x.shape[1]) if p not in set(upos.tolist()) | set(ipos.tolist())
                  and enc.attention_mask[row, p]]
        assert torch.equal(x[row, others], table[enc.input_ids[row, others]])
    # the placeholder text never reaches the tokenizer
    assert "<UserID>" not in backbone.tokenizer.decode(enc.input_ids[0])


def fake_ctx(tmp_path):
    return SimpleNamespace(seed=0, run=RunDir(tmp_path, resume=False), log=lambda message: None)


def test_step1_trains_only_lora_and_step2_only_the_cie(tiny, tmp_path):
    backbone = fresh(tiny)
    frame = sample_frame(8)
    text_prompter, ids_prompter = prompters(backbone)
    labels = torch.tensor(frame["label"].to_numpy(), dtype=torch.float32)
    ctx = fake_ctx(tmp_path)
    scorer = Scorer(ctx.run, backbone, "Yes", "No", 4)
    base_before = {k: v.detach().clone() for k, v in backbone.model.named_parameters()}
    step1 = dict(DEFAULTS["step1"], epochs=1, batch_size=4, grad_accum=1, lr=1e-2)
    texts = text_prompter(frame)
    examples = [(t, "Yes" if y else "No") for t, y in zip(texts, frame["label"])]
    lora_step(ctx.run, backbone, examples, DEFAULTS["lora"], step1, 0, "step1", tmp_path / "step1_adapter",
              evaluate=lambda: valid_auc(frame, scorer.scores(texts)))
    after1 = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
              for k, v in backbone.model.named_parameters()}
    lora = {k for k in after1 if "lora_" in k}
    assert lora and all(not torch.equal(after1[k], torch.zeros_like(after1[k])) for k in lora if "lora_B" in k)
    assert all(torch.equal(after1[k], v) for k, v in base_before.items())  # base weights untouched
    assert (tmp_path / "step1_adapter" / "adapter_config.json").is_file()
    assert not any(p.requires_grad for p in backbone.model.parameters())  # LoRA frozen after step 1

    torch.manual_seed(0)
    cf, cie = FakeCF(), CIE(6, backbone.hidden_size)
    cf_before = {k: v.detach().clone() for k, v in cf.state_dict().items()}
    cie_before = {k: v.detach().clone() for k, v in cie.state_dict().items()}
    slots = CoLLMSlots(cf, cie, "<UserID>", "<TargetItemID>", tune_cf=False)
    prompts = ids_prompter(frame)

    def loss_fn(batch):
        return backbone.yes_no_bce([prompts[i] for i in batch], labels[batch], slots=slots(frame.iloc[batch]))

    # gradients of one step 2 loss reach the CIE only
    loss_fn([0, 1, 2]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cie.parameters())
    assert all(p.grad is None for p in backbone.model.parameters())
    assert all(p.grad is None for p in cf.parameters())
    cie.zero_grad()
    config = TrainConfig.from_config(dict(DEFAULTS["step2"], batch_size=4, grad_accum=1), 0, "step2")
    train_slot_modules(ctx.run, backbone, slots, config, len(frame), loss_fn, lambda: 0.5, "step2")
    after2 = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in backbone.model.named_parameters()}
    assert all(torch.equal(after2[k], after1[k]) for k in after1)  # LoRA and base unchanged by step 2
    assert all(torch.equal(cf.state_dict()[k], v) for k, v in cf_before.items())  # CF frozen
    assert any(not torch.equal(cie.state_dict()[k], v) for k, v in cie_before.items())


def test_cf_tuning_option_trains_the_cf_model_too(tiny):
    backbone = fresh(tiny)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    cf = FakeCF()
    slots = CoLLMSlots(cf, CIE(6, backbone.hidden_size), "<UserID>", "<TargetItemID>", tune_cf=True)
    frame = sample_frame(2)
    _, ids_prompter = prompters(backbone)
    backbone.yes_no_bce(ids_prompter(frame), torch.tensor([1.0, 0.0]), slots=slots(frame)).backward()
    assert cf.user.weight.grad is not None and "cf.user.weight" in slots.state_dict()


def test_soft_prompt_fills_its_slot_with_the_same_vectors_for_every_row():
    prompt = SoftPrompt(torch.randn(3, 8))
    out = prompt(4)
    assert out.shape == (4, 3, 8) and torch.equal(out[0], out[3])


def test_prompter_rejects_missing_or_stray_slots(tiny):
    p = DEFAULTS["prompt"]
    with pytest.raises(InputError, match="exactly once"):
        Prompter(p["text"], tiny.tokenizer, require=("<UserID>",))
    with pytest.raises(InputError, match="must not contain"):
        Prompter(p["ids"], tiny.tokenizer, forbid=("<UserID>",))
    with pytest.raises(InputError, match="unknown field"):
        Prompter({"instruction": "{oops}", "input": ""}, tiny.tokenizer, check_fields=SAMPLE_FIELDS)


# ------------------------------------------------------------------------------------------ end to end
def test_collm_end_to_end_on_tiny_llama(tmp_path):
    out = tmp_path / "run"
    metrics = run_method("collm", "ml-100k", out, sets=TINY_RUN + ["eval.zero_cf=true"])
    for key in ("auc", "uauc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold"):
        assert key in metrics["test"] and key in metrics["baselines"]["step1"]["test"]
        assert key in metrics["baselines"]["cf"]["test"] and key in metrics["ablation"]["zero_cf"]["test"]
    assert 0.0 <= metrics["test"]["auc"] <= 1.0
    assert metrics["test"]["n_warm"] == 12 and metrics["test"]["n_cold"] == 12
    assert (out / "step1_adapter" / "adapter_model.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "step 1 only (TALLRec)" in report and "CF embeddings zeroed" in report
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"]["auc"] == pytest.approx(metrics["test"]["auc"])
    # per-sample test scores of every row, and CoLLM minus each row paired on the same samples
    predictions = json.loads((out / "predictions-test.json").read_text())
    assert sorted(predictions["scores"]) == ["cf", "collm", "item_like_rate", "step1", "zero-cf"]
    assert sum(predictions["warm"]) == 12
    warm = np.asarray(predictions["warm"], dtype=bool)
    labels = np.asarray(predictions["label"], dtype=bool)
    collm, cf = (np.asarray(predictions["scores"][k]) for k in ("collm", "cf"))
    assert auc(labels, collm) == pytest.approx(metrics["test"]["auc"])
    difference = metrics["paired"]["collm-cf"]["auc_warm"]
    assert difference["difference"] == pytest.approx(auc(labels[warm], collm[warm]) - auc(labels[warm], cf[warm]))
    assert difference["difference"] == pytest.approx(metrics["test"]["auc_warm"]
                                                     - metrics["baselines"]["cf"]["test"]["auc_warm"])
    assert difference["ci"] is None or difference["ci"][0] <= difference["difference"] <= difference["ci"][1]
    assert set(metrics["paired"]) == {"collm-cf", "collm-item_like_rate", "collm-step1", "collm-zero-cf"}
    assert "history_like_ratio" not in metrics["baselines"]  # CoLLM's histories list liked items only
    assert "item like-rate (counting, no model)" in report


def test_collm_resume_after_an_interruption_gives_the_same_result(tmp_path, monkeypatch):
    sets = TINY_RUN + ["step2.epochs=2", "step2.patience=0", "eval.step1=false"]
    reference = run_method("collm", "ml-100k", tmp_path / "ref", sets=sets)
    calls = {"n": 0}
    original = Backbone.yes_no_bce

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 + 4 + 2:  # step 1: 4 batches; step 2: epoch 1 (4 batches), then 2 into epoch 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Backbone, "yes_no_bce", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_method("collm", "ml-100k", tmp_path / "run", sets=sets)
    assert (tmp_path / "run" / "checkpoints" / "step2.safetensors").is_file()
    assert not (tmp_path / "run" / "metrics.json").exists()
    calls["n"] = 0

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Backbone, "yes_no_bce", counting)
    resumed = run_method("collm", "ml-100k", tmp_path / "run", sets=sets, resume=True)
    assert calls["n"] == 4  # only step 2's second epoch is trained again (step 1 and epoch 1 come from checkpoints)
    assert resumed["training"]["step1"]["steps"] == reference["training"]["step1"]["steps"]
    for key in ("auc", "uauc", "auc_warm", "auc_cold"):
        assert resumed["test"][key] == pytest.approx(reference["test"][key], abs=1e-6)


def test_softprompt_end_to_end_on_tiny_llama(tmp_path):
    metrics = run_method("softprompt", "ml-100k", tmp_path / "sp",
                         sets=[s for s in TINY_RUN if not s.startswith(("cf.", "step"))] + ["softprompt.tokens=3"])
    assert {"auc", "uauc", "auc_warm", "auc_cold", "uauc_warm", "uauc_cold"} <= set(metrics["test"])
    assert metrics["training"]["steps"] >= 1
    # the counting floor on the same test cases, and Soft-Prompt paired against it
    floor = metrics["baselines"]["item_like_rate"]
    assert floor["counting"] and 0 <= floor["test"]["auc"] <= 1 and "auc_ci" in floor["test"]
    difference = metrics["paired"]["softprompt - item_like_rate"]["auc"]
    assert difference["difference"] == pytest.approx(metrics["test"]["auc"] - floor["test"]["auc"])


@pytest.mark.parametrize("setting, message", [
    ("cf.model=bpr", "cf.model"),
    ("cie.tokens=0", "cie.tokens"),
    ("data_protocol.split_by=random", "split_by"),
    ("data_protocol.eval_seed=-1", "data_protocol.eval_seed"),
    ("prompt.item_slot=<UserID>", "different"),
])
def test_bad_config_is_rejected_before_anything_is_written(tmp_path, setting, message):
    with pytest.raises(InputError, match=message):
        run_method("collm", "ml-100k", tmp_path / "bad", sets=[*TINY_RUN, setting])
    assert not (tmp_path / "bad").exists()


def test_step1_init_from_loads_a_saved_adapter_exactly(tiny, tmp_path):
    from recalign.llm import LoraSettings

    source = fresh(tiny)
    source.add_lora(LoraSettings())
    with torch.no_grad():
        for name, parameter in source.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    run_dir = tmp_path / "previous"
    source.save_adapter(run_dir / "step1_adapter")
    texts = ["Answer with Yes or No. Will the user enjoy Fargo?", "Will the user enjoy Heat (1995)?"]
    target = fresh(tiny)
    ctx = fake_ctx(tmp_path / "new")
    summary = lora_step(ctx.run, target, [], DEFAULTS["lora"], DEFAULTS["step1"], 0, "step1",
                        tmp_path / "new" / "step1_adapter", init_from=step1_adapter(str(run_dir)))
    assert summary["loaded_from"].endswith("step1_adapter")
    assert torch.allclose(source.score_yes_no(texts), target.score_yes_no(texts), atol=1e-6)
    with pytest.raises(InputError, match="init_from"):
        step1_adapter(str(tmp_path))


def test_a_title_holding_a_slot_placeholder_is_refused_naming_the_item():
    import pandas as pd

    from recalign.data import build_dataset
    from recalign.tasks.text import check_titles_free_of

    rows = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"], "rating": [4, 2, 5],
                         "timestamp": [1, 2, 3]})
    items = pd.DataFrame({"item_id": ["x", "y"], "title": ["Plain", "The <UserID> story"]})
    ds = build_dataset("hand", rows, items)
    check_titles_free_of(ds, {"<ItemID>": "prompt.item_slot"})
    with pytest.raises(InputError, match=r"^hand: item 'y' has the title 'The <UserID> story', which holds the "
                                         r"placeholder <UserID>; choose another prompt.user_slot"):
        check_titles_free_of(ds, {"<UserID>": "prompt.user_slot"})
