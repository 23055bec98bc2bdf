"""model.dtype auto per machine, RECALIGN_DTYPE, float32 where training needs it, and the int8 scoring path
(tiny random Llama with the real SmolLM2 tokenizer; no timings are asserted)."""

from __future__ import annotations

import pytest
import torch

from recalign.errors import InputError
from recalign.llm import MODEL_CONFIG, Backbone, Checkpointer, LoraSettings, TrainConfig, Wrapper, tiny_llama, train_lora
from recalign.llm import precision
from recalign.llm.loading import check_model_config

NO_BF16 = frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512_vnni"})
WITH_BF16 = NO_BF16 | {"avx512_bf16"}


@pytest.fixture(scope="module")
def tok():
    return Backbone.load("tiny-random").tokenizer


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)


def texts(tok, n: int = 6) -> list[str]:
    wrap = Wrapper("chat", system="", tokenizer=tok)
    titles = ["Star Wars (1977)", "Toy Story (1995)", "Fargo (1996)", "Heat (1995)", "Babe (1995)"]
    return [wrap('Given the user\'s preference, answer "Yes." or "No.".',
                 f"User Preference: \"{titles[i % 5]}\"\nWill the user like \"{titles[(i + 2) % 5]}\"?")
            for i in range(n)]


def toy(tok) -> list[tuple[str, str]]:
    wrap = Wrapper("chat", system="", tokenizer=tok)
    return [(wrap("Answer Yes or No.", f"Is {w} {c}?"), "Yes." if c == "red" else "No.")
            for w in ("apple", "river", "stone", "cloud", "music", "paper") for c in ("red", "blue")]


def with_adapter(tok, dtype=torch.float32, seed: int = 0) -> Backbone:
    """A tiny backbone carrying a LoRA adapter whose B matrices are non-zero (so the adapter matters)."""
    model = Backbone(tiny_llama(tok).to(dtype), tok, batch_size=4)
    torch.manual_seed(seed)
    model.add_lora(LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model


# ------------------------------------------------------------------ the decision
def test_explicit_env_and_fixed_rules(no_env, monkeypatch):
    assert precision.decide("bf16", "cpu").dtype == torch.bfloat16
    assert precision.decide("float32", "cpu").reason == "model.dtype: float32"
    assert precision.decide("auto", "cuda").dtype == torch.bfloat16
    tiny = precision.decide("auto", "cpu", source="tiny-random")
    assert tiny.dtype == torch.float32 and "tiny-random" in tiny.reason
    with pytest.raises(InputError, match="model.dtype"):
        precision.decide("float64", "cpu")
    with pytest.raises(InputError, match="model.quantize"):
        precision.decide("auto", "cpu", quantize="int4")
    with pytest.raises(InputError, match="model.quantize"):
        precision.decide("bfloat16", "cpu", quantize="int8")
    with pytest.raises(InputError, match="model.quantize"):
        precision.decide("auto", "cuda", quantize="int8")

    # a CPU keeps float32 under auto until bf16 scoring is within tolerance (AUTO_CPU_BF16); the reason says so
    cpu = precision.decide("auto", "cpu", source="smollm2-135m-instruct")
    assert cpu.dtype == torch.float32 and cpu.reason.startswith("auto: float32")
    monkeypatch.setattr(precision, "AUTO_CPU_BF16", True)
    monkeypatch.setattr(precision, "_this_cpu", lambda: precision.Precision(torch.bfloat16, "auto: measured"))
    assert precision.decide("auto", "cpu").as_dict() == {"dtype": "bfloat16", "reason": "auto: measured",
                                                         "quantize": "none"}
    assert precision.decide("auto", "cpu", source="tiny-random").dtype == torch.float32

    monkeypatch.setenv(precision.ENV, "bfloat16")
    chosen = precision.decide("auto", "cpu", source="tiny-random")
    assert chosen.dtype == torch.bfloat16 and precision.ENV in chosen.reason
    assert precision.decide("float32", "cpu").dtype == torch.float32  # only `auto` is overridden
    with pytest.raises(InputError, match="model.quantize"):
        precision.decide("auto", "cpu", quantize="int8")
    monkeypatch.setenv(precision.ENV, "half-ish")
    with pytest.raises(InputError, match=precision.ENV):
        precision.decide("auto", "cpu")


def test_cpu_flags_and_one_cached_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("RECALIGN_HOME", str(tmp_path))
    calls = []

    def measure(fp32, bf16):
        def run():
            calls.append(1)
            return {"float32_gflops": fp32, "bfloat16_gflops": bf16}
        return run

    def never():
        raise AssertionError("a CPU without native bfloat16 must not be measured")

    plain = precision.cpu_decision("Old CPU", NO_BF16, measure=never)
    assert plain.dtype == torch.float32 and "no native bfloat16" in plain.reason

    fast = precision.cpu_decision("New CPU", WITH_BF16, measure=measure(200.0, 800.0))
    assert fast.dtype == torch.bfloat16 and "avx512_bf16" in fast.reason and "4.0x" in fast.reason
    again = precision.cpu_decision("New CPU", WITH_BF16, measure=never)  # the cached verdict
    assert again.dtype == torch.bfloat16 and "cached" in again.reason and len(calls) == 1

    # the flag alone is not enough: bf16 that is not clearly faster than float32 stays off
    slow = precision.cpu_decision("Odd CPU", WITH_BF16 | {"amx_bf16"}, measure=measure(200.0, 220.0))
    assert slow.dtype == torch.float32 and "amx_bf16" in slow.reason and len(calls) == 2
    assert precision.cpu_decision("Odd CPU", WITH_BF16 | {"amx_bf16"}, measure=never).dtype == torch.float32
    assert (tmp_path / "precision.json").is_file()

    model, flags = precision.cpu_info()  # this machine: whatever it is, the flags are read
    assert isinstance(model, str) and isinstance(flags, frozenset)


def test_config_key_and_check():
    assert MODEL_CONFIG["quantize"] == "none" and MODEL_CONFIG["dtype"] == "auto"
    check_model_config({"dtype": "bf16", "quantize": "int8"})
    check_model_config({"dtype": "auto", "quantize": None}, training=True)
    with pytest.raises(InputError, match="model.quantize"):
        check_model_config({"dtype": "auto", "quantize": "int8"}, training=True)
    with pytest.raises(InputError, match="model.dtype"):
        check_model_config({"dtype": "double"})


def test_recalign_dtype_float32_reproduces_float32_exactly(tok, tmp_path, monkeypatch):
    tiny_llama(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    prompts = texts(tok)
    explicit = Backbone.load(str(tmp_path / "model"), dtype="float32")
    monkeypatch.setenv(precision.ENV, "float32")
    forced = Backbone.from_config({**MODEL_CONFIG, "name": str(tmp_path / "model")})
    assert forced.dtype == torch.float32
    assert forced.precision == {"dtype": "float32", "reason": "RECALIGN_DTYPE=float32 overrides model.dtype: auto",
                                "quantize": "none"}
    assert torch.equal(forced.score_yes_no(prompts), explicit.score_yes_no(prompts))
    monkeypatch.setenv(precision.ENV, "bfloat16")
    half = Backbone.load(str(tmp_path / "model"))
    assert half.dtype == torch.bfloat16 and half.precision["dtype"] == "bfloat16"


# ------------------------------------------------------------------ bf16: what stays float32
class _Memory:
    resume = False

    def __init__(self):
        self.saved = {}

    def save_checkpoint(self, name, state):
        self.saved[name] = state

    def load_checkpoint(self, name):
        return None


def test_bf16_training_keeps_lora_optimizer_and_loss_in_float32(tok, tmp_path):
    model = Backbone(tiny_llama(tok).to(torch.bfloat16), tok, batch_size=4)
    model.add_lora(LoraSettings(r=4, alpha=8, dropout=0.0))
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    examples = toy(tok)
    prompts, answers = [p for p, _ in examples], [a for _, a in examples]
    for use_prefix in (True, False):
        loss, _ = model.lm_loss(prompts[:4], answers[:4], prefix_cache=use_prefix)
        assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    model.model.zero_grad(set_to_none=True)
    assert model.yes_no_bce(prompts[:4], torch.tensor([1.0, 0.0, 1.0, 0.0])).dtype == torch.float32

    with model.evaluating():
        before = float(model.lm_loss(prompts, answers)[0])
    memory, evaluations = _Memory(), iter(range(100))
    result = train_lora(model, examples, TrainConfig(epochs=6, batch_size=6, lr=5e-2, patience=0),
                        evaluate=lambda: next(evaluations), checkpointer=Checkpointer(memory, "t"))
    with model.evaluating():
        after = float(model.lm_loss(prompts, answers)[0])
    assert result.steps == 12 and after < before - 0.5  # bf16 base + float32 LoRA learns
    state = memory.saved["t"]["optimizer"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
                         for s in state.values())
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}

    model.save_adapter(tmp_path / "adapter")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values()} == {
        torch.float32}
    reloaded = Backbone(tiny_llama(tok).to(torch.bfloat16), tok, batch_size=4)
    reloaded.load_adapter(tmp_path / "adapter")
    assert {p.dtype for n, p in reloaded.model.named_parameters() if "lora_" in n} == {torch.float32}
    assert torch.equal(reloaded.score_yes_no(prompts), model.score_yes_no(prompts))


def test_bf16_scores_are_float32_and_close_to_float32(tok):
    prompts = texts(tok)
    fp32 = with_adapter(tok, torch.float32)
    bf16 = with_adapter(tok, torch.bfloat16)
    bf16.set_adapter_state(fp32.adapter_state())
    a, b = fp32.score_yes_no(prompts), bf16.score_yes_no(prompts, prefix_cache=False)
    cached = bf16.score_yes_no(prompts, batch_size=2, prefix_cache=True)
    assert b.dtype == torch.float32 and cached.dtype == torch.float32
    spread = float(a.max() - a.min())
    assert spread > 0.05
    assert float((a - b).abs().max()) < 0.1 * spread
    assert float((cached - b).abs().max()) < 0.1 * spread


# ------------------------------------------------------------------ int8
def test_int8_scoring_merges_the_adapter_and_refuses_training(tok, tmp_path):
    pytest.importorskip("torchao", reason="model.quantize: int8 needs torchao")
    prompts = texts(tok)
    fp32 = with_adapter(tok)
    fp32.save_adapter(tmp_path / "adapter")
    reference = fp32.score_yes_no(prompts)

    int8 = Backbone(tiny_llama(tok), tok, batch_size=4, quantize="int8")
    assert int8.precision["quantize"] == "int8"
    with pytest.raises(InputError, match="model.quantize"):
        int8.add_lora(LoraSettings())
    with pytest.raises(InputError, match="model.quantize"):
        int8.load_adapter(tmp_path / "adapter", trainable=True)
    int8.load_adapter(tmp_path / "adapter")
    scores = int8.score_yes_no(prompts)
    assert not int8.is_peft  # merged into the weights, then quantised
    layer = int8.causal_lm.model.layers[0]
    assert layer.self_attn.q_proj.weight.qdata.dtype == torch.int8
    assert layer.mlp.down_proj.weight.qdata.dtype == torch.int8
    head = int8.causal_lm.lm_head.weight
    assert type(head) is torch.nn.Parameter and head.dtype == torch.float32  # Yes/No logits: a float32 head
    assert scores.dtype == torch.float32
    spread = float(reference.max() - reference.min())
    assert float((scores - reference).abs().max()) < 0.1 * spread
    assert torch.corrcoef(torch.stack([scores, reference]))[0, 1] > 0.95
    plain = Backbone(tiny_llama(tok), tok, batch_size=4).score_yes_no(prompts)
    assert float((scores - plain).abs().max()) > 0.1 * spread  # the adapter was applied
    # activation scales are per token: batching and the prefix cache change (almost) nothing
    assert torch.allclose(int8.score_yes_no(prompts, batch_size=1), scores, atol=1e-5)
    assert torch.allclose(int8.score_yes_no(prompts, prefix_cache=False), scores, atol=2e-3)
    with pytest.raises(InputError, match="before the first"):
        int8.load_adapter(tmp_path / "adapter")
    with pytest.raises(InputError, match="model.quantize"):
        Backbone(tiny_llama(tok).to(torch.bfloat16), tok, quantize="int8").score_yes_no(prompts)


def test_from_config_records_precision(tok, no_env):
    pytest.importorskip("torchao", reason="model.quantize: int8 needs torchao")
    backbone = Backbone.from_config({**MODEL_CONFIG, "name": "tiny-random", "quantize": "int8"})
    int8 = precision.decide("auto", "cpu", quantize="int8")
    assert int8.dtype == torch.float32 and int8.as_dict() == {"dtype": "float32", "reason": int8.reason,
                                                              "quantize": "int8"}
    assert backbone.precision == int8.as_dict()
    assert "int8" in backbone.precision["reason"]
    assert backbone.score_yes_no(texts(tok, 2)).shape == (2,)
    with pytest.raises(InputError, match="model.quantize"):
        Backbone.from_config({**MODEL_CONFIG, "name": "tiny-random", "quantize": "int4"})


def test_recalign_dtype_is_recorded_in_the_run_config_so_a_resume_cannot_mix_dtypes(monkeypatch):
    from recalign.errors import InputError
    from recalign.llm.precision import with_env_dtype

    config = {"model": {"name": "tiny-random", "dtype": "auto"}, "seed": 0}
    monkeypatch.delenv("RECALIGN_DTYPE", raising=False)
    assert with_env_dtype(config) is config
    monkeypatch.setenv("RECALIGN_DTYPE", "bfloat16")
    assert with_env_dtype(config)["model"]["dtype"] == "bfloat16" and config["model"]["dtype"] == "auto"
    assert with_env_dtype({"model": {"dtype": "float32"}})["model"]["dtype"] == "float32"  # explicit wins
    assert with_env_dtype({"seed": 0}) == {"seed": 0}  # no LLM
    monkeypatch.setenv("RECALIGN_DTYPE", "bogus")
    with pytest.raises(InputError, match="RECALIGN_DTYPE: unknown dtype 'bogus'"):
        with_env_dtype(config)
