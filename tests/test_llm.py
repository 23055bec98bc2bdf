"""The LLM backbone on a tiny random Llama (real SmolLM2 tokenizer); one slow test on the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

from recalign.errors import InputError
from recalign.llm import (Backbone, Checkpointer, LoraSettings, TrainConfig, Wrapper, fit_history,
                          train_loop, train_lora)
from recalign.runs import RunDir
from recalign.tasks.text import quote_titles

INSTRUCTION = ("Given the user's preference and unpreference, identify whether the user will like the target "
               'movie by answering "Yes." or "No.".')


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    torch.manual_seed(0)
    return Backbone.load("tiny-random", batch_size=4)


def fresh(tiny: Backbone) -> Backbone:
    from recalign.llm import tiny_llama

    return Backbone(tiny_llama(tiny.tokenizer), tiny.tokenizer, batch_size=4)


def prompts(tiny: Backbone, n: int = 7) -> list[str]:
    wrap = Wrapper("chat", system="", tokenizer=tiny.tokenizer)
    titles = ["Star Wars (1977)", "Toy Story (1995)", "Fargo (1996)", "Heat (1995)", "Babe (1995)"]
    return [wrap(INSTRUCTION, f"User Preference: {quote_titles(titles[: 1 + i % 5])}\n"
                              f"Whether the user will like the target movie \"{titles[i % 5]}\"?")
            for i in range(n)]


def test_score_equals_plain_full_forward(tiny):
    texts = prompts(tiny)
    scores = tiny.score_yes_no(texts, prefix_cache=False)
    yes, no = tiny.yes_no_ids()
    for text, score in zip(texts, scores):
        ids = torch.tensor([tiny.tokenize(text)], device=tiny.device)
        with torch.no_grad():
            logits = tiny.model(input_ids=ids).logits[0, -1]
        assert abs(float(logits[yes] - logits[no]) - float(score)) < 1e-5


def test_left_padding_and_prefix_cache_invariance(tiny):
    texts = prompts(tiny)
    batched = tiny.score_yes_no(texts, batch_size=7, prefix_cache=False)
    alone = torch.cat([tiny.score_yes_no([t], prefix_cache=False) for t in texts])
    cached = tiny.score_yes_no(texts, batch_size=3, prefix_cache=True)
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(cached, alone, atol=1e-5)
    assert batched.std() > 0  # different prompts, different scores


def test_yes_no_ids_resolved_from_tokenizer(tiny):
    yes, no = tiny.yes_no_ids("Yes.", "No.")
    assert tiny.tokenizer.decode([yes]) == "Yes" and tiny.tokenizer.decode([no]) == "No"
    assert tiny.yes_no_ids(" Yes", " No") != (yes, no)
    with pytest.raises(InputError):
        tiny.yes_no_ids("Yes", "Yes!")


def toy_examples(tiny) -> list[tuple[str, str]]:
    wrap = Wrapper("chat", system="", tokenizer=tiny.tokenizer)
    words = ["apple", "river", "stone", "cloud", "music", "paper", "glass", "tiger"]
    return [(wrap("Answer Yes or No.", f"Is {w} {color}?"), "Yes." if color == "red" else "No.")
            for w in words for color in ("red", "blue")]


def test_lora_training_learns_a_toy_task_and_adapters_round_trip(tiny, tmp_path):
    model = fresh(tiny)
    model.add_lora(LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")))
    examples = toy_examples(tiny)
    texts, answers = [p for p, _ in examples], [a for _, a in examples]
    with model.evaluating():
        before = float(model.lm_loss(texts, answers)[0])
    result = train_lora(model, examples, TrainConfig(epochs=20, batch_size=8, lr=5e-2, patience=0))
    with model.evaluating():
        after = float(model.lm_loss(texts, answers)[0])
    assert result.steps == 40 and result.tokens > 0
    # a random tiny model has near-uniform logits (loss ~ ln 49152); tied, tiny embeddings limit how low it can go
    assert after < before - 0.5
    scores = model.score_yes_no(texts)
    labels = torch.tensor([a == "Yes." for a in answers])
    assert scores[labels].min() > scores[~labels].max()  # the toy task is learned (AUC 1)

    model.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = fresh(tiny)
    assert not torch.allclose(reloaded.score_yes_no(texts), scores)
    reloaded.load_adapter(tmp_path / "adapter")
    assert torch.equal(reloaded.score_yes_no(texts), scores)


def test_answer_only_loss_counts_only_answer_tokens(tiny):
    texts = prompts(tiny, 2)
    answer_loss, answer_tokens = tiny.lm_loss(texts, ["Yes.", "No."])
    all_loss, all_tokens = tiny.lm_loss(texts, ["Yes.", "No."], answer_only=False)
    assert answer_tokens == 4
    assert all_tokens == sum(tiny.count_tokens(t) for t in texts) + 4 - 2  # first token of each row has no target
    # the answer-only loss equals cross-entropy computed by hand from a full forward
    ids = torch.tensor([tiny.tokenize(texts[0]) + tiny.tokenize_piece("Yes.")])
    with torch.no_grad():
        logits = tiny.model(input_ids=ids).logits[0]
        single, _ = tiny.lm_loss(texts[:1], ["Yes."])
    manual = torch.nn.functional.cross_entropy(logits[-3:-1], ids[0, -2:])
    assert abs(float(manual) - float(single)) < 1e-5
    assert float(all_loss.detach()) > 0 and float(answer_loss.detach()) > 0


def test_injection_changes_outputs_only_through_placeholders(tiny):
    texts = ["The user <UserID> likes", "Short <UserID> then a longer tail of words"]
    hidden = tiny.hidden_size
    a = {"<UserID>": torch.randn(2, hidden)}
    b = {"<UserID>": torch.randn(2, hidden)}
    enc = tiny.encode(texts, slot_k={"<UserID>": 1})
    with torch.no_grad():
        la, lb = tiny.logits(enc, a, keep=0), tiny.logits(enc, b, keep=0)
    for row in range(2):
        pos = int(enc.slot_positions["<UserID>"][row, 0])
        assert torch.allclose(la[row, :pos], lb[row, :pos], atol=1e-6)  # before the slot: unchanged
        assert not torch.allclose(la[row, pos:], lb[row, pos:], atol=1e-4)  # from the slot on: changed
    # injecting a token's own embedding is the same as having that token there
    token = tiny.tokenize_piece(" Fargo")[0]
    own = {"<UserID>": tiny.input_embeddings().weight[token].detach().expand(2, hidden)}
    replaced = enc.input_ids.clone()
    replaced[torch.arange(2), enc.slot_positions["<UserID>"][:, 0]] = token
    with torch.no_grad():
        injected = tiny.logits(enc, own, keep=0)
        plain = tiny.model(input_ids=replaced, attention_mask=enc.attention_mask,
                           position_ids=enc.position_ids).logits
    assert torch.allclose(injected, plain, atol=1e-5)
    # multi-token slots and gradients to the module producing them
    projector = torch.nn.Linear(3, 2 * hidden)
    slots = {"<UserID>": projector(torch.randn(2, 3)).view(2, 2, hidden)}
    out = tiny.forward_with_injection(texts, slots)
    assert out.shape == (2, len(tiny.tokenizer))
    out[:, 0].sum().backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
    with pytest.raises(InputError):
        tiny.forward_with_injection(["no placeholder here", "x"], {"<UserID>": torch.randn(2, hidden)})


class OnlyTokens(LogitsProcessor):
    def __init__(self, allowed):
        self.allowed = torch.tensor(sorted(allowed))

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.allowed] = 0
        return scores + mask


def test_generate_obeys_constraint_and_returns_all_beams(tiny):
    texts = prompts(tiny, 3)
    allowed = set(tiny.tokenize_piece(" red blue green")) | {tiny.tokenizer.eos_token_id}
    out = tiny.generate(texts, num_beams=3, logits_processor=OnlyTokens(allowed), max_new_tokens=4)
    assert out.scores.shape == (3, 3)
    for rows, scores in zip(out.token_ids, out.scores):
        assert len(rows) == 3
        assert all(t in allowed for row in rows for t in row)
        assert scores[0] >= scores[1] >= scores[2]
    greedy = tiny.generate(texts, max_new_tokens=4)
    assert [len(t) for t in greedy.texts] == [1, 1, 1]
    # greedy decoding agrees with the first token of the argmax of a forward pass
    with torch.no_grad():
        first = tiny.model(input_ids=torch.tensor([tiny.tokenize(texts[0])])).logits[0, -1].argmax()
    assert greedy.token_ids[0][0][0] == int(first)


def test_embed_pooling_is_padding_invariant(tiny):
    texts = ["a short one", "a much longer text that needs padding on the other rows of the batch"]
    last = tiny.embed(texts, pooling="last")
    mean = tiny.embed(texts, pooling="mean")
    ids = torch.tensor([tiny.tokenize(texts[0])])
    with torch.no_grad():
        hidden = tiny.causal_lm.model(input_ids=ids).last_hidden_state[0]
    assert torch.allclose(last[0], hidden[-1], atol=1e-5)
    assert torch.allclose(mean[0], hidden.mean(0), atol=1e-5)
    assert torch.allclose(tiny.embed(texts[:1], pooling="mean")[0], mean[0], atol=1e-5)
    with pytest.raises(InputError):
        tiny.embed(texts, pooling="max")


def test_train_loop_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(4), torch.randn(1)) for _ in range(12)]

    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))

    def loss_fn(model):
        return lambda batch: ((model(torch.stack([x for x, _ in batch])) - torch.stack([y for _, y in batch])) ** 2).mean()

    def state_fns(model):
        return (lambda: {k: v.clone() for k, v in model.state_dict().items()}), model.load_state_dict

    config = TrainConfig(epochs=4, batch_size=3, grad_accum=2, lr=1e-2, eval_every=1, patience=0, seed=3)
    scores = iter(range(100))
    reference = make()
    expected = train_loop(list(reference.parameters()), data, loss_fn(reference), config, evaluate=lambda: next(scores),
                          get_state=state_fns(reference)[0], set_state=state_fns(reference)[1],
                          set_train_mode=reference.train)

    run = RunDir(tmp_path / "run", resume=True)
    calls = {"n": 0}

    def crashing_eval():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return calls["n"]

    interrupted = make()
    get, put = state_fns(interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_loop(list(interrupted.parameters()), data, loss_fn(interrupted), config, evaluate=crashing_eval,
                   get_state=get, set_state=put, checkpointer=Checkpointer(run, "t"), set_train_mode=interrupted.train)
    resumed = make()
    get, put = state_fns(resumed)
    result = train_loop(list(resumed.parameters()), data, loss_fn(resumed), config, evaluate=crashing_eval,
                        get_state=get, set_state=put, checkpointer=Checkpointer(run, "t"), set_train_mode=resumed.train)
    assert result.steps == 8
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    # the logged loss (a mean over the last epoch's steps) too: the steps before the interruption are kept
    assert [h["loss"] for h in result.history] == pytest.approx([h["loss"] for h in expected.history], abs=1e-6)


def test_fit_history_drops_oldest_items_never_the_target():
    titles = [f"Movie {i}" for i in range(10)]

    def render(k):
        return f"History: {quote_titles(titles[len(titles) - k:])}. Target: \"Final\""

    text, kept = fit_history(render, 10, len, 60)
    assert len(text) <= 60 and kept < 10 and "Movie 9" in text and "Movie 0" not in text and "Final" in text
    text, kept = fit_history(render, 10, len, 5)
    assert kept == 0 and "Final" in text


def test_wrappers_and_bad_sources(tiny, tmp_path):
    alpaca = Wrapper("alpaca", tokenizer=tiny.tokenizer)("Do it.", "Input here")
    assert alpaca.endswith("### Response:\n") and "### Input:\nInput here" in alpaca
    chat = Wrapper("auto", system="", tokenizer=tiny.tokenizer)("Do it.")
    assert chat.endswith("<|im_start|>assistant\n")
    with pytest.raises(InputError):
        Wrapper("fancy", tokenizer=tiny.tokenizer)
    with pytest.raises(InputError, match="model.name"):
        Backbone.load("not a model/name !")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        Backbone.load(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="lora.target_modules"):
        fresh(tiny).add_lora(LoraSettings(target_modules=("nope_proj",)))


def test_load_from_local_directory_gives_same_scores(tiny, tmp_path):
    tiny.causal_lm.save_pretrained(tmp_path / "model")
    tiny.tokenizer.save_pretrained(tmp_path / "model")
    local = Backbone.load(str(tmp_path / "model"), dtype="float32")
    texts = prompts(tiny, 3)
    assert torch.allclose(local.score_yes_no(texts), tiny.score_yes_no(texts), atol=1e-6)


@pytest.mark.slow
def test_real_smollm2_answers_sensibly():
    model = Backbone.load("smollm2-135m-instruct")
    assert model.hidden_size == 576 and model.precision["dtype"] == str(model.dtype).removeprefix("torch.")
    assert model.dtype in (torch.float32, torch.bfloat16)  # auto: per machine
    wrap = Wrapper("chat", system=None, tokenizer=model.tokenizer)
    out = model.generate([wrap("What is the capital of France?")], max_new_tokens=12)
    assert "Paris" in out.texts[0][0]
    yes, no = model.yes_no_ids()
    assert model.tokenizer.decode([yes]) == "Yes" and model.tokenizer.decode([no]) == "No"
    scores = model.score_yes_no([wrap('Is the sky blue? Answer "Yes" or "No".'),
                                 wrap('Is fire cold? Answer "Yes" or "No".')])
    assert torch.isfinite(scores).all()


def test_shared_prefix_training_loss_and_gradients_match_plain_batch(tiny):
    model = fresh(tiny)
    model.add_lora(LoraSettings(r=4, alpha=8, dropout=0.0))
    lora_b = [p for n, p in model.model.named_parameters() if "lora_B" in n]
    for p in lora_b:  # LoRA B starts at zero; make the adapter active so that gradients reach every part
        torch.nn.init.normal_(p, std=0.05)
    texts, answers = prompts(tiny, 5), ["Yes.", "No.", "Yes.", "No.", "Yes."]
    results = []
    for use_prefix in (False, True):
        model.model.zero_grad()
        loss, n = model.lm_loss(texts, answers, prefix_cache=use_prefix)
        loss.backward()
        results.append((float(loss.detach()), n, [p.grad.clone() for p in model.trainable_parameters()]))
    (plain, n_plain, g_plain), (cached, n_cached, g_cached) = results
    assert n_plain == n_cached == 10
    assert abs(plain - cached) < 1e-5
    for a, b in zip(g_plain, g_cached):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_prefix_cache_auto_follows_device(tiny):
    from recalign.config import resolve
    from recalign.llm import MODEL_NULLABLE
    from recalign.methods.icl import DEFAULTS

    assert Backbone(tiny.model, tiny.tokenizer).prefix_cache is (tiny.device.type == "cpu")
    assert Backbone(tiny.model, tiny.tokenizer, prefix_cache=False).prefix_cache is False
    assert resolve(DEFAULTS, nullable=MODEL_NULLABLE)["model"]["prefix_cache"] is None  # null = auto
    assert resolve(DEFAULTS, sets=["model.prefix_cache=false"],
                   nullable=MODEL_NULLABLE)["model"]["prefix_cache"] is False
    with pytest.raises(InputError, match="prefix_cache"):
        resolve(DEFAULTS, sets=["model.prefix_cache=sometimes"], nullable=MODEL_NULLABLE)


def test_a_hub_id_without_a_network_is_one_quick_line(monkeypatch):
    import socket

    from recalign.errors import InputError

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # nothing cached
    with pytest.raises(InputError) as caught:
        Backbone.load("no-such-org/no-such-model")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.name: could not load 'no-such-org/no-such-model'")
    assert message.endswith("huggingface.co cannot be reached from this machine")
