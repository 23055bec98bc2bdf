"""The seed's sequential baselines in the CF registry: DROS (a robust loss on SASRec / GRU4Rec / Caser), ACVAE
(adversarial + contrastive sequential VAE) and DreamRec (guided diffusion over the next item's embedding).
Each learns a planted sequence, resumes exactly, and its loss / schedule / guidance match closed forms."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from recalign.cf import (TrainData, create_model, evaluate_ranking, leave_one_out_sets, load_model, make_query,
                         train_cf_model)
from recalign.cf.dreamrec import Diffusion, beta_schedule
from recalign.cf.dros import dro_term
from recalign.errors import InputError

from test_cf import cycle_log

SMALL_SASREC = {"embedding_size": 32, "dropout": 0.1, "max_len": 10, "inner_size": 64}
MODELS = {
    "dros": {"sasrec": SMALL_SASREC},
    "dros-gru4rec": {"backbone": "gru4rec", "gru4rec": {"embedding_size": 32, "hidden_size": 32, "dropout": 0.1,
                                                        "max_len": 10}},
    "dros-caser": {"backbone": "caser", "caser": {"embedding_size": 32, "dropout": 0.1, "max_len": 3}},
    "acvae": {"embedding_size": 32, "hidden_size": 32, "latent_size": 16, "dropout": 0.1, "max_len": 10},
    "dreamrec": {"embedding_size": 32, "inner_size": 64, "max_len": 10, "timesteps": 50},
}
TRAIN = {"epochs": 25, "batch_size": 256, "lr": 0.01, "patience": 0}


def _train(key: str, data, epochs: int = TRAIN["epochs"], **kwargs):
    return train_cf_model(key.split("-")[0], data, {"model": MODELS[key], "train": {**TRAIN, "epochs": epochs}},
                          **kwargs)


@pytest.fixture(scope="module")
def cycles():
    frame, n_users, n_items = cycle_log()
    return leave_one_out_sets(frame, n_users, n_items)


@pytest.fixture(scope="module")
def trained(cycles):
    data, _, _ = cycles
    return {key: _train(key, data, seed=0) for key in MODELS}


@pytest.mark.parametrize("key", list(MODELS))
def test_learns_planted_sequence(trained, cycles, key):
    """Every user walks a fixed cycle over 100 items: the next item is a function of the last one."""
    _, _, test = cycles
    model = trained[key]
    metrics = evaluate_ranking(model, test, ks=(10,))
    assert metrics["hr@10"] >= 0.9, metrics  # random: 10 / 87 unseen items ~ 0.11
    history = model.train_summary["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


@pytest.mark.parametrize("key", list(MODELS))
def test_shapes_and_save_load(trained, cycles, key, tmp_path):
    _, _, test = cycles
    model = trained[key]
    query = make_query(test.users[:5], test.histories[:5], model.n_items, model.max_len)
    with torch.no_grad():
        scores = model.score(query)
        assert scores.shape == (5, model.n_items) and torch.isfinite(scores).all()
        states = model.hidden_states(query)
        assert states.dim() == 3 and states.shape[0] == 5
        assert model.sequence_representation(query).shape == (5, model.item_embeddings().shape[1])
        assert torch.equal(model.score(query), scores)  # deterministic (DreamRec: a fixed noise draw)
        model.save(tmp_path / "m.pt")
        assert torch.equal(load_model(tmp_path / "m.pt").score(query), scores)


# ------------------------------------------------------------------------------------------------ DROS
def test_dro_term_on_a_three_item_example():
    scores = torch.tensor([[2.0, -1.0, 0.5]])
    weights = torch.tensor([0.5, 1.0, 2.0])
    # per-item squared errors (target 0 labelled 1): 1, 1, 0.25; times the weights / beta 0.5: 1, 2, 1
    expected = math.log(math.e + math.e ** 2 + math.e)
    term = dro_term(scores, torch.tensor([0]), torch.tensor([True]), weights, beta=0.5)
    assert term.item() == pytest.approx(expected, rel=1e-6)
    # a disliked target (label 0) is pushed to 0 like every other item: errors 4, 1, 0.25 -> 4, 2, 1
    term = dro_term(scores, torch.tensor([0]), torch.tensor([False]), weights, beta=0.5)
    assert term.item() == pytest.approx(math.log(math.e ** 4 + math.e ** 2 + math.e), rel=1e-6)


def test_dros_prior_is_popularity_to_the_exponent():
    frame = pd.DataFrame({"user": [0, 0, 0, 1], "item": [0, 0, 1, 0]})
    model = create_model("dros", 2, 3, prior_exponent=0.5)
    model.prepare(TrainData.from_interactions(frame, 2, 3))
    counts = np.array([3, 1, 0]) + 1.0
    assert torch.allclose(model.prior, torch.tensor((counts / counts.sum()) ** 0.5, dtype=torch.float32))


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "caser"])
def test_dros_with_alpha_zero_is_its_backbone(cycles, backbone):
    """alpha = 0: the same parameters, epoch for epoch, as the backbone trained on its own loss."""
    data, _, _ = cycles
    params = MODELS["dros" if backbone == "sasrec" else f"dros-{backbone}"][backbone]
    train = {**TRAIN, "epochs": 2}
    dros = train_cf_model("dros", data, {"model": {"backbone": backbone, "alpha": 0.0, backbone: params},
                                         "train": train}, seed=1)
    plain = train_cf_model(backbone, data, {"model": params, "train": train}, seed=1)
    ours, theirs = dros.backbone.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("objective", ["ce", "bce", "bpr", "mse"])
def test_dros_loss_is_base_plus_alpha_times_term(cycles, objective):
    data, _, _ = cycles
    from recalign.cf.batches import build_windows, window_batches

    with_term = create_model("dros", data.n_users, data.n_items, alpha=0.3, beta=2.0, **MODELS["dros"])
    without = create_model("dros", data.n_users, data.n_items, alpha=0.0, **MODELS["dros"])
    for model in (with_term, without):
        model.prepare(data)
        model.eval()  # no dropout: both see the same states
    without.load_state_dict(with_term.state_dict())
    windows = build_windows(data, with_term.max_len, with_term.stride)
    batch = next(window_batches(windows, 64, np.random.default_rng(0)))
    torch.manual_seed(0)  # the same sampled negatives for both
    total = with_term.loss(batch, objective)
    torch.manual_seed(0)
    base = without.loss(batch, objective)
    states, targets, labels = with_term.target_states(batch)
    term = dro_term(states @ with_term.item_table().T, targets, labels, with_term.prior, 2.0).mean()
    assert total.item() == pytest.approx((base + 0.3 * term).item(), rel=1e-5)


def test_dros_sampled_objectives_need_negatives(cycles):
    data, _, _ = cycles
    with pytest.raises(InputError, match="model.negatives"):
        train_cf_model("dros", data, {"model": {"negatives": 0, **MODELS["dros"]},
                                      "train": {**TRAIN, "epochs": 1, "objective": "bpr"}})


# ------------------------------------------------------------------------------------------- DreamRec
def test_diffusion_schedule_matches_closed_forms():
    b, steps = 0.02, 10
    diffusion = Diffusion(beta_schedule("linear", steps, b, b))
    t = torch.arange(steps, dtype=torch.float64)
    abar = (1 - b) ** (t + 1)  # t is 0-based
    abar_prev = (1 - b) ** t
    assert torch.allclose(diffusion.alphas_cumprod.double(), abar, rtol=1e-6)
    assert torch.allclose(diffusion.posterior_variance.double(), b * (1 - abar_prev) / (1 - abar), rtol=1e-5)
    assert torch.allclose(diffusion.posterior_coef1.double(), b * abar_prev.sqrt() / (1 - abar), rtol=1e-5)
    assert torch.allclose(diffusion.posterior_coef2.double(), (1 - abar_prev) * (1 - b) ** 0.5 / (1 - abar),
                          rtol=1e-5)
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    step = torch.tensor([0, 3, 5, 9])
    expected = abar[step].sqrt().float()[:, None] * x0 + (1 - abar[step]).sqrt().float()[:, None] * noise
    assert torch.allclose(diffusion.q_sample(x0, step, noise), expected, atol=1e-6)
    # the posterior mean given the true x0 and x_1 = sqrt(1 - b) x0 + sqrt(b) eps is x0 exactly (abar_0 = 1)
    x1 = diffusion.q_sample(x0, torch.zeros(4, dtype=torch.long), noise)
    assert torch.allclose(diffusion.p_step(x0, x1, 0, torch.zeros(3)), x0, atol=1e-6)
    # the reference's exp schedule: sum of -log(1 - beta_t) = beta_min + (beta_max - beta_min)(T + 1) / (2T)
    betas = beta_schedule("exp", 200)
    assert float(torch.log(1 - betas).sum()) == pytest.approx(-(0.1 + 9.9 * 201 / 400), rel=1e-9)
    assert (beta_schedule("cosine", 50) > 0).all()


def test_dreamrec_guidance_weight(trained, cycles):
    model = trained["dreamrec"]
    _, _, test = cycles
    query = make_query(test.users[:4], test.histories[:4], model.n_items, model.max_len)
    with torch.no_grad():
        h = model.sequence_representation(query)
        x, t = torch.randn_like(h), torch.tensor([0, 10, 20, 49])
        conditional = model.denoiser(x, h, t)
        unconditional = model.denoiser(x, model.none.expand_as(h), t)
        assert torch.equal(model.predict_x0(x, h, t, 0.0), conditional)
        assert torch.allclose(model.predict_x0(x, h, t, 2.0), 3 * conditional - 2 * unconditional, atol=1e-5)
        unguided, guided = model.generate(h, 0.0), model.generate(h, 2.0)
        assert not torch.allclose(unguided, guided)
        # a row's sample does not depend on its batch (up to float rounding of batched matmuls)
        assert torch.allclose(model.generate(h[:1], 2.0), guided[:1], atol=1e-4)
        # the guidance key is what score() uses
        model.params["guidance"] = 0.0
        try:
            assert torch.allclose(model.query_embedding(query), unguided)
        finally:
            model.params["guidance"] = MODELS["dreamrec"].get("guidance", 2.0)


# --------------------------------------------------------------------------------------- all three
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("key", ["dros-caser", "acvae", "dreamrec"])
def test_resume_matches_uninterrupted_run(cycles, key, tmp_path):
    data, valid, _ = cycles
    full = _train(key, data, epochs=3, valid=valid, run=tmp_path / "full", seed=2)

    def stop(epoch, record):
        if epoch == 1:
            raise Interrupt()

    with pytest.raises(Interrupt):
        _train(key, data, epochs=3, valid=valid, run=tmp_path / "cut", seed=2, on_epoch_end=stop)
    resumed = _train(key, data, epochs=3, valid=valid, run=tmp_path / "cut", seed=2)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in full.train_summary["history"]] == [r["loss"] for r in resumed.train_summary["history"]]


@pytest.mark.parametrize("name, params, key", [
    ("dros", {"alpha": -0.1}, "model.alpha"),
    ("dros", {"beta": 0.0}, "model.beta"),
    ("dros", {"beta": float("nan")}, "model.beta"),
    ("dros", {"backbone": "bert4rec"}, "model.backbone"),
    ("dros", {"prior_exponent": float("inf")}, "model.prior_exponent"),
    ("dros", {"sasrec": {"n_layer": 1}}, "unknown model parameter"),
    ("acvae", {"kl_weight": float("nan")}, "model.kl_weight"),
    ("acvae", {"contrast_weight": -1.0}, "model.contrast_weight"),
    ("dreamrec", {"timesteps": 0}, "model.timesteps"),
    ("dreamrec", {"guidance": -1.0}, "model.guidance"),
    ("dreamrec", {"guidance": float("nan")}, "model.guidance"),
    ("dreamrec", {"schedule": "quadratic"}, "model.schedule"),
    ("dreamrec", {"uncond_prob": 1.0}, "model.uncond_prob"),
    ("dreamrec", {"beta_start": 0.1, "beta_end": 0.01}, "model.beta_end"),
])
def test_bad_hyper_parameters_name_the_key(name, params, key):
    with pytest.raises(InputError, match=key):
        create_model(name, 3, 5, **params)


def test_dreamrec_has_no_ctr_objective(cycles):
    data, _, _ = cycles
    with pytest.raises(InputError, match="objective 'bce'"):
        train_cf_model("dreamrec", data, {"train": {"epochs": 1, "objective": "bce"}})


def test_config_keys_resolve_through_the_method_defaults():
    """`--set model.backbone=caser --set model.caser.max_len=3` reaches the nested backbone parameters."""
    from recalign.config import resolve
    from recalign.methods.cf_baseline import _defaults

    config = resolve(_defaults("dros"), sets=["model.backbone=caser", "model.caser.max_len=3", "model.alpha=0.2"])
    model = create_model("dros", 4, 6, **config["model"])
    assert model.backbone.name == "caser" and model.max_len == 3 and model.params["alpha"] == 0.2
    with pytest.raises(InputError, match="model.caser.max_lenn"):
        resolve(_defaults("dros"), sets=["model.caser.max_lenn=3"])


def test_full_profile_declares_the_seed_baselines_with_valid_choices():
    from recalign.methods import all_experiments
    from recalign.runner import resolve_config

    full = {e.name: e for e in all_experiments() if "full" in e.profiles}
    assert {"dros", "acvae", "dreamrec"} <= set(full)
    dros = resolve_config("dros", None, [f"{k}={v}" for k, v in full["dros"].full.items()])
    assert dros["model"]["backbone"] == "sasrec" and dros["model"]["alpha"] > 0 and dros["model"]["beta"] > 0
    dreamrec = resolve_config("dreamrec", None, [f"{k}={v}" for k, v in full["dreamrec"].full.items()])
    assert dreamrec["model"]["guidance"] == 0.5
    assert resolve_config("acvae", None, [])["protocol"] == "loo"
