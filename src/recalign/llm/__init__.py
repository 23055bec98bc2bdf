"""The LLM backbone shared by every LLM method (ICL, TALLRec, BIGRec, CoLLM, TransRec, RecInterpreter).

Loading
    Backbone.load(source="smollm2-135m-instruct", dtype="auto", device="auto", batch_size=8, prefix_cache=None)
    Backbone.from_config(cfg["model"])           # keys: name, dtype, device, batch_size, prefix_cache
                                                 # (defaults: llm.MODEL_CONFIG, the shared `model:` section)
        source: embedded asset name (GGUF, dequantized once to safetensors under $RECALIGN_HOME/models/),
        "tiny-random" (2-layer hidden-64 random Llama + SmolLM2 tokenizer; tests), a local model directory or
        .gguf file, or a Hugging Face id (online only). dtype auto = float32 on CPU, bfloat16 on CUDA.
    load_model(source, dtype, device) -> (model, tokenizer);  load_tokenizer(source);  tiny_llama(tokenizer)

Prompts (llm.prompts): the one renderer; fields come from the task (`recalign.tasks.text.frame_fields`)
    Prompter(template, tokenizer, wrapper, system, max_tokens, require=slots, forbid=slots).render_all(samples)
    Wrapper(kind="auto"|"chat"|"alpaca"|"plain", system="", tokenizer=tok)(instruction, input) -> str
    fill(template, where, **fields);  fit_history(render, n, count, max)

Shared steps (llm.steps), resumable through a checkpoint store (a run directory or recalign.io.Checkpoints)
    lora_step(store, backbone, examples, lora, train, seed, name, adapter_dir, evaluate, init_from=...)
    train_slot_modules(store, backbone, modules, TrainConfig, n_train, loss_fn, valid_score, name)
    generate_step(store, backbone, prompts, name, beams, max_new_tokens);  Scorer(store, backbone, yes, no)
    LORA_CONFIG (the `lora:` section), train_section(**overrides) (a `train:` section), GENERATIVE_TRAIN (the
    generative LoRA methods' `train:`), check_lora, check_train
Slot modules (llm.slots): CIE (CoLLM), SoftPrompt (+ soft_prompt_init)

Backbone methods (prompts are rendered strings; all batching/left padding/position ids handled inside)
    tokenize(text) -> ids;  tokenize_piece(text) -> ids (no specials);  count_tokens(text)
    answer_token_id(answer) -> int;  yes_no_ids(yes="Yes", no="No") -> (int, int)
    score_yes_no(prompts, yes="Yes", no="No", slots=None, batch_size=None, prefix_cache=None, progress=None)
        -> float32 CPU tensor [N] = logit(yes) - logit(no) at the first answer position; one forward per batch,
        last-position logits only, shared-prefix KV cache reused across batches (no slots).
    yes_no_logits(prompts, slots=None, yes, no) -> [B] differentiable (one batch, no sorting/cache)
    yes_no_bce(prompts, labels, slots=None, yes, no) -> scalar loss (CoLLM)
    lm_loss(prompts, answers, slots=None, answer_only=True) -> (loss, n_target_tokens), differentiable
    forward_with_injection(prompts, slots) -> next-token logits [B, V], differentiable
        slots: {"<UserID>": tensor [B, hidden] or [B, k, hidden]}; each placeholder must occur exactly once
        per prompt and becomes k positions whose input embeddings are the given vectors (gradients flow to
        whatever module produced them, e.g. CoLLM's projector). Every method above accepts `slots` too.
    generate(prompts, num_beams=1, logits_processor=None, max_new_tokens=32, num_return_sequences=None,
             slots=None, batch_size=None, **hf_kwargs) -> Generation(texts[N][R], scores[N,R], token_ids[N][R])
    embed(texts, pooling="last"|"mean", batch_size=None, adapter=True, progress=None) -> float32 [N, hidden]
    encode(prompts, answers=None, slot_k=None) -> Encoded;  logits(encoded, slots=None, keep=1) -> [B, keep, V]
    evaluating() context (eval mode + no_grad);  input_embeddings();  hidden_size, device, dtype, causal_lm
    add_lora(LoraSettings(r=8, alpha=16, dropout=0.05, target_modules=("q_proj","v_proj")))
    trainable_parameters();  adapter_state() / set_adapter_state(state)
    save_adapter(dir) (peft format, safetensors, atomic);  load_adapter(dir, trainable=False)

Training (llm.train)
    TrainConfig(epochs, batch_size, grad_accum, lr, weight_decay, warmup_steps, schedule, max_grad_norm,
                eval_every, patience, max_steps, seed);  TrainConfig.from_config(cfg["train"], seed)
    train_lora(backbone, [(prompt, answer)], config, evaluate=None, checkpointer=None, answer_only=True,
               loss="lm"|"bce", yes="Yes", no="No", log=print) -> TrainResult
    train_loop(parameters, examples, loss_fn, config, evaluate, get_state, set_state, checkpointer, log,
               set_train_mode) -> TrainResult   # generic: e.g. train a projector with LoRA frozen
    Checkpointer(run_dir, name): state saved after each evaluation; rerunning resumes exactly.
"""

from recalign.llm.backbone import Backbone, Encoded, Generation, LoraSettings
from recalign.llm.loading import (DEFAULT_MODEL, MODEL_CONFIG, MODEL_NULLABLE, TINY_NAME, load_model, load_tokenizer,
                                  tiny_llama)
from recalign.llm.prompts import Prompter, Wrapper, fill, fit_history
from recalign.llm.slots import CIE, SoftPrompt, soft_prompt_init
from recalign.llm.steps import (GENERATIVE_TRAIN, LORA_CONFIG, Scorer, answer_loss, check_lora, check_model, check_train, check_yes_no, generate_step, lora_step, train_section,
                                train_slot_modules)
from recalign.llm.train import Checkpointer, TrainConfig, TrainResult, train_loop, train_lora

__all__ = [
    "Backbone", "CIE", "answer_loss", "Checkpointer", "DEFAULT_MODEL", "Encoded", "GENERATIVE_TRAIN", "Generation", "LORA_CONFIG", "LoraSettings",
    "MODEL_CONFIG", "MODEL_NULLABLE", "Prompter", "Scorer", "SoftPrompt", "TINY_NAME", "TrainConfig", "TrainResult",
    "Wrapper", "check_lora", "check_model", "check_train", "check_yes_no", "fill", "fit_history", "generate_step", "load_model", "load_tokenizer",
    "lora_step", "soft_prompt_init", "tiny_llama", "train_loop", "train_lora", "train_section", "train_slot_modules",
]
