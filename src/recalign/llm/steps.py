"""The LLM steps every LLM method composes, each resumable through a checkpoint store (any object with
`save_checkpoint(name, state)` / `load_checkpoint(name)`: a run directory, `recalign.io.Checkpoints`):

- `lora_step`: fresh LoRA adapters tuned on (prompt, answer) pairs (or loaded from `init_from`), early
  stopping on a validation callback, the adapter saved as a peft directory;
- `train_slot_modules`: train slot modules (CIE, soft prompts, projectors) with every LLM weight frozen;
- `generate_step`: beam search over many prompts, checkpointed every block of prompts;
- `Scorer`: Yes/No scores of prompt lists, timed, and cached in the store so a resumed run does not score
  a set twice.

In a multi-process run (`recalign.distributed`) the training steps are data-parallel: every process starts
from the main process's weights, takes its share of each micro-batch, and the gradients are averaged before
each optimizer step, so the processes stay identical and the effective batch is one process's
(`data_parallel`); scoring is shared out by `Backbone.score_yes_no`; only the main process writes.

Config vocabulary: `LORA_CONFIG` is the `lora:` section and `train_section(...)` builds a `train:`-style
section (every `TrainConfig` key once, in one spelling) for every LLM method.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from recalign import distributed
from recalign.errors import InputError
from recalign.llm.backbone import Backbone, LoraSettings
from recalign.llm.train import Checkpointer, TrainConfig, train_lora, train_loop

LORA_CONFIG = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


def train_section(**overrides) -> dict:
    """Every `TrainConfig` key with its default, then `overrides` (which may add method keys, e.g. shots)."""
    base = {f.name: f.default for f in fields(TrainConfig) if f.name != "seed"}
    return {**base, **overrides}


# the `train:` section of the generative LoRA methods (BIGRec, TransRec, P5, GPT4Rec): few-shot samples from the
# training period, the best epoch chosen by the valid answer loss
GENERATIVE_TRAIN = train_section(
    shots=1024,  # N few-shot training samples from the training period (0 = all)
    batch_size=8,
    lr=1e-3,
    patience=1,  # validations without a lower valid answer loss before stopping (0 = never)
    valid_loss_size=64,  # valid samples whose answer loss selects the best epoch (0 = no validation)
    answer_only=True,  # false: LM loss on every token, as BIGRec's reference code does
)


def check_model(section: Mapping, where: str = "model", training: bool = False) -> None:
    """The `model:` section (source, dtype, quantize; `training`: LoRA will be trained on it)."""
    from recalign.llm.loading import check_model_config, check_source

    check_source(section["name"])
    check_model_config(section, training=training)
    if section["batch_size"] < 1:
        raise InputError(f"{where}.batch_size must be >= 1, got {section['batch_size']}")


def check_yes_no(yes: str, no: str, where: str = "prompt") -> None:
    if not yes or not no or yes == no:
        raise InputError(f"{where}.yes / {where}.no must be two different non-empty answers, got {yes!r} / {no!r}")


def check_lora(section: Mapping, where: str = "lora") -> None:
    if section["r"] < 1 or section["alpha"] <= 0 or not 0 <= section["dropout"] < 1:
        raise InputError(f"{where}: need r >= 1, alpha > 0, 0 <= dropout < 1; got r={section['r']}, "
                         f"alpha={section['alpha']}, dropout={section['dropout']}")
    targets = section["target_modules"]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise InputError(f"{where}.target_modules must be a non-empty list of module names, got {targets}")


def check_train(section: Mapping, where: str = "train", min_epochs: int = 1) -> None:
    """The TrainConfig keys of a section (epochs may be allowed to be 0: the step is skipped)."""
    epochs = section["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < min_epochs:
        raise InputError(f"{where}.epochs: expected an integer >= {min_epochs}, got {epochs!r}")
    TrainConfig.from_config({**section, "epochs": max(1, epochs)}, where=where)
    if "loss" in section and section["loss"] not in ("lm", "bce"):
        raise InputError(f"{where}.loss must be 'lm' or 'bce', got {section['loss']!r}")
    if "shots" in section and section["shots"] < 0:
        raise InputError(f"{where}.shots must be >= 0 (0 = all training samples), got {section['shots']}")


def lora_step(store, backbone: Backbone, examples: Sequence[tuple[str, str]], lora: Mapping, train: Mapping,
              seed: int, name: str, adapter_dir: str | Path, evaluate: Callable[[], float] | None = None,
              log: Callable[[str], None] = lambda m: None, init_from: str | None = None, yes: str = "Yes",
              no: str = "No") -> dict:
    """Fresh LoRA adapters (seeded), tuned on `examples` with `train` (a train section: TrainConfig keys plus
    `loss` lm|bce and `answer_only`; `yes`/`no` are the answers the bce loss contrasts), best state by
    `evaluate` (higher = better), checkpointed under `name` (a rerun resumes exactly). The adapter is saved to `adapter_dir`. With `init_from` (a peft adapter
    directory) the adapter is loaded instead of trained. The adapter is frozen afterwards. Returns the
    training summary."""
    backbone.remove_lora()
    torch.manual_seed(seed)
    backbone.add_lora(LoraSettings.from_config(lora))
    started = time.perf_counter()
    if init_from:
        backbone.load_adapter(init_from)
        log(f"{name}: LoRA adapter loaded from {init_from}")
        freeze(backbone)
        return {"loaded_from": str(init_from), "seconds": time.perf_counter() - started}
    processes = distributed.current()
    processes.broadcast(backbone.trainable_parameters())  # the same start on every process
    config, store = data_parallel(TrainConfig.from_config(train, seed=seed), store, processes)
    result = train_lora(backbone, examples, config, evaluate=evaluate,
                        checkpointer=Checkpointer(store, name), answer_only=bool(train.get("answer_only", True)),
                        loss=train.get("loss", "lm"), yes=yes, no=no, log=log,
                        processes=processes if processes.active else None)
    if processes.main:
        backbone.save_adapter(adapter_dir)
    processes.barrier()
    freeze(backbone)
    return {**result.as_dict(), "seconds": time.perf_counter() - started}


def data_parallel(config: TrainConfig, store, processes: "distributed.Processes") -> tuple[TrainConfig, object]:
    """The loop's config and checkpoint store for `processes` (unchanged for one process).

    Every optimizer step takes the same `batch_size * grad_accum` examples, in the same order, as one
    process. When the processes divide `grad_accum`, each takes whole micro-batches of `batch_size` (the
    loop's micro-batch grows to `batch_size * processes`, `grad_accum` shrinks by as much); otherwise each
    takes a part of every micro-batch. The checkpoint counts micro-batches of `train.batch_size` either way,
    so a run continues with another number of processes."""
    if not processes.active or config.grad_accum % processes.size:
        return config, store
    k = processes.size
    return replace(config, batch_size=config.batch_size * k, grad_accum=config.grad_accum // k), _Position(store, k)


class _Position:
    """A checkpoint store for a loop whose micro-batch holds `k` configured micro-batches: `micro` is saved
    in units of the configured micro-batch (the position of one process's run)."""

    def __init__(self, store, k: int):
        self.store, self.k = store, k

    @property
    def resume(self) -> bool:
        return getattr(self.store, "resume", True)

    def save_checkpoint(self, name: str, state: dict):
        return self.store.save_checkpoint(name, {**state, "micro": int(state["micro"]) * self.k})

    def load_checkpoint(self, name: str):
        state = self.store.load_checkpoint(name)
        if state is None:
            return None
        if int(state["micro"]) % self.k:
            raise InputError(f"checkpoint {name} stopped after micro-batch {state['micro']}, which {self.k} "
                             f"processes cannot continue from; continue it with one process")
        return {**state, "micro": int(state["micro"]) // self.k}


def freeze(backbone: Backbone) -> None:
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)


def answer_loss(backbone: Backbone, examples: Sequence[tuple[str, str]], batch_size: int,
                answer_only: bool = True) -> Callable[[], float] | None:
    """A validation callback for `lora_step`: the mean answer-token loss on (prompt, answer) pairs, negated
    (higher = better for the loop); None when there are no pairs."""
    if not examples:
        return None

    @torch.no_grad()
    def evaluate() -> float:
        total, count = 0.0, 0
        processes = distributed.current()  # each process a share of the batches, the sums added up
        for start in processes.share(range(0, len(examples), batch_size)):
            batch = examples[start:start + batch_size]
            loss, n = backbone.lm_loss([p for p, _ in batch], [a for _, a in batch], answer_only=answer_only)
            total, count = total + loss.item() * n, count + n
        if processes.active:
            total, count = processes.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return -total / max(1, count)
    return evaluate


def train_slot_modules(store, backbone: Backbone, modules: torch.nn.Module, config: TrainConfig, n_train: int,
                       loss_fn: Callable[[list[int]], torch.Tensor], valid_score: Callable[[], float], name: str,
                       log: Callable[[str], None] = lambda m: None) -> dict:
    """Train the parameters of `modules` that require a gradient; every other backbone weight (LoRA included)
    is frozen. The state of `modules` is what is checkpointed and restored (best `valid_score`)."""
    own = {id(p) for p in modules.parameters() if p.requires_grad}
    for parameter in backbone.model.parameters():
        if id(parameter) not in own:
            parameter.requires_grad_(False)
    backbone.model.eval()  # no dropout in the frozen LLM; gradients still flow to the slot embeddings
    parameters = [p for p in modules.parameters() if p.requires_grad]
    started = time.perf_counter()
    processes = distributed.current()
    processes.broadcast(parameters)
    config, store = data_parallel(config, store, processes)
    result = train_loop(parameters, list(range(n_train)), loss_fn, config, evaluate=valid_score,
                        get_state=lambda: {k: v.detach().clone() for k, v in modules.state_dict().items()},
                        set_state=modules.load_state_dict, checkpointer=Checkpointer(store, name),
                        log=log, set_train_mode=modules.train, processes=processes if processes.active else None)
    return {**result.as_dict(), "seconds": time.perf_counter() - started}


def generate_step(store, backbone: Backbone, prompts: list[str], name: str, beams: int, max_new_tokens: int,
                  batch_size: int | None = None, block: int = 32, decoding: Mapping | None = None, trie=None,
                  assistant=None, assistant_weight: float = 0.0, seed: int = 0, **generate_kwargs) -> dict:
    """Beam search for every prompt -> {"texts": [[beam texts]], "scores": [[beam scores]]}, checkpointed
    as `generations-NAME` every `block` prompts (a rerun continues where it stopped). `generate_kwargs` go
    to `Backbone.generate` (e.g. `stopping_criteria`, `logits_processor`).

    `decoding`: the decoding keys of a `generate:` section (`llm.decoding.DECODING_CONFIG`; None = plain
    beam search, exactly as before): `d3` / `sample` run `llm.decoding`'s loops (`beams` sequences returned
    per prompt), `constrained` keeps answers on `trie` (`llm.decoding.TitleTrie`); `assistant`: [prompts,
    items] CF log-probabilities added with `assistant_weight` (d3); `seed` seeds sampling per block."""
    from recalign.progress import track
    from recalign.llm import decoding as dec

    section = dict(decoding or {})
    mode = section.get("decoding", "beam")
    if section:
        dec.check_decoding(section)
    if mode == "beam" and section.get("constrained"):
        if trie is None:
            raise InputError("generate.constrained needs the catalogue's title trie")
        extra = generate_kwargs.pop("logits_processor", None)
        extra = list(extra) if isinstance(extra, (list, tuple)) else ([extra] if extra is not None else [])
        generate_kwargs["logits_processor"] = extra + [dec.TrieConstraint(trie, backbone.tokenizer.eos_token_id)]
    if mode != "beam" and set(generate_kwargs) - {"logits_processor"}:
        raise InputError(f"generate.decoding {mode}: unsupported generate options {sorted(generate_kwargs)}")

    state = store.load_checkpoint(f"generations-{name}") or {"texts": [], "scores": []}
    if len(state["texts"]) > len(prompts):
        raise InputError(f"checkpoint generations-{name} holds more cases than this run has; use a new --out")
    starts = range(len(state["texts"]), len(prompts), block)
    label = f"{beams} beams" if mode != "sample" else f"{section.get('samples', 8)} samples"
    for start in track(starts, f"generating {name} ({label}{', ' + mode if mode != 'beam' else ''})"):
        if mode == "beam":
            out = backbone.generate(prompts[start:start + block], num_beams=beams, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size or None, **generate_kwargs)
        else:
            extra = generate_kwargs.get("logits_processor")
            extra = list(extra) if isinstance(extra, (list, tuple)) else ([extra] if extra is not None else [])
            rows = None if assistant is None else torch.as_tensor(assistant)[start:start + block]
            out = dec.decode_block(backbone, prompts[start:start + block], section, beams, max_new_tokens,
                                   batch_size or None, trie=trie, assistant=rows, weight=float(assistant_weight),
                                   seed=int(seed) * 1_000_003 + start, extra_processors=extra)
        state["texts"].extend(out.texts)
        state["scores"].extend(out.scores.tolist())
        store.save_checkpoint(f"generations-{name}", state)
    return state


class Scorer:
    """Yes/No scores (logit(yes) - logit(no)) of prompt lists; `seconds` adds up the scoring time."""

    def __init__(self, store, backbone: Backbone, yes: str, no: str, batch_size: int | None = None):
        self.store, self.backbone, self.yes, self.no, self.batch_size = store, backbone, yes, no, batch_size
        self.seconds = 0.0

    def scores(self, prompts: Sequence[str], slots: Mapping[str, torch.Tensor] | None = None,
               progress: str | None = None) -> np.ndarray:
        started = time.perf_counter()
        out = self.backbone.score_yes_no(list(prompts), yes=self.yes, no=self.no, slots=slots,
                                         batch_size=self.batch_size, progress=progress).numpy()
        self.seconds += time.perf_counter() - started
        return out

    def cached(self, name: str, n: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """`compute()`'s scores, kept as checkpoint `eval-NAME` and read back on resume (when it holds n)."""
        saved = self.store.load_checkpoint(f"eval-{name}") if getattr(self.store, "resume", False) else None
        if saved is not None and len(saved["scores"]) == n:
            return np.asarray(saved["scores"])
        scores = compute()
        self.store.save_checkpoint(f"eval-{name}", {"scores": scores, "seconds": self.seconds})
        return scores
