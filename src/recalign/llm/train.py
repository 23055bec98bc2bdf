"""A readable training loop (torchtune style, no Trainer): AdamW, linear warm-up then constant or cosine
decay, gradient accumulation, clipping, evaluation every N optimizer steps with early stopping on a
validation callback (higher = better), best-state restore, and checkpoint + exact resume.

`train_loop` is generic: it trains whatever `parameters` are, with a `loss_fn(batch_of_examples)` that
returns a loss (or `(loss, n_tokens)`). `train_lora` is the LoRA instruction-tuning recipe on top of it.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from recalign.errors import InputError


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 4  # micro-batch (examples per forward/backward)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after warm-up)
    max_grad_norm: float = 1.0
    eval_every: int = 0  # also evaluate every N optimizer steps within an epoch (every epoch end always evaluates)
    patience: int = 3  # evaluations without improvement before stopping; 0 = never stop early
    max_steps: int = 0  # 0 = no cap
    seed: int = 0

    @classmethod
    def from_config(cls, section: Mapping, seed: int = 0, where: str = "train") -> "TrainConfig":
        known = {k: v for k, v in section.items() if k in cls.__dataclass_fields__}
        config = cls(**{**known, "seed": seed})
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(config, name) < 1:
                raise InputError(f"{where}.{name} must be >= 1, got {getattr(config, name)}")
        if config.schedule not in ("constant", "cosine"):
            raise InputError(f"{where}.schedule must be 'constant' or 'cosine', got {config.schedule!r}")
        if config.lr <= 0:
            raise InputError(f"{where}.lr must be > 0, got {config.lr}")
        return config


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: float = 0.0
    best_score: float | None = None
    best_step: int = 0
    stopped_early: bool = False
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # one row per evaluation

    def as_dict(self) -> dict:
        return asdict(self)


class Checkpointer:
    """Saves/loads the loop state through a `RunDir` (atomic) under `name`."""

    def __init__(self, run, name: str):
        self.run, self.name = run, name

    def save(self, state: dict) -> None:
        self.run.save_checkpoint(self.name, state)

    def load(self) -> dict | None:
        return self.run.load_checkpoint(self.name) if getattr(self.run, "resume", True) else None


def train_loop(parameters: Sequence[torch.nn.Parameter], examples: Sequence, loss_fn: Callable,
               config: TrainConfig, evaluate: Callable[[], float] | None = None,
               get_state: Callable[[], dict] | None = None, set_state: Callable[[dict], None] | None = None,
               checkpointer: Checkpointer | None = None, log: Callable[[str], None] = lambda m: None,
               set_train_mode: Callable[[bool], None] | None = None, processes=None) -> TrainResult:
    """Train `parameters` on `examples`; returns a TrainResult. With `evaluate`, the best-scoring state
    (per `get_state`) is restored at the end. With a `checkpointer`, state is saved after every
    evaluation and the loop resumes from it (same example order, same RNG). `processes`
    (`recalign.distributed.Processes`): each micro-batch is shared out and the gradients averaged."""
    parameters = list(parameters)
    if processes is not None:
        loss_fn = processes.shard_loss(loss_fn)
    if not parameters:
        raise InputError("nothing to train: no parameter requires a gradient")
    if not examples:
        raise InputError("no training examples")
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    micro_per_epoch = math.ceil(len(examples) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    def lr_factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "cosine":
            progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    result = TrainResult()
    best_state, bad_evals, epoch, micro = None, 0, 0, 0
    losses: list[float] = []  # per optimizer step; the history's loss is the mean over the last epoch's worth
    saved = checkpointer.load() if checkpointer else None
    if saved is not None:
        if set_state:
            set_state(saved["state"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        result = TrainResult(**saved["result"])
        best_state, bad_evals, epoch, micro = saved["best_state"], saved["bad_evals"], saved["epoch"], saved["micro"]
        losses = [float(x) for x in saved.get("losses", [])]  # so the first loss after a resume is the same
        log(f"resumed training at step {result.steps} (epoch {epoch}, batch {micro})")
        if saved.get("finished"):
            if best_state is not None and set_state:
                set_state(best_state)
            return result
    started = time.perf_counter() - result.seconds

    def do_eval() -> bool:
        """Evaluate, track the best state, save a checkpoint; True = stop early."""
        nonlocal best_state, bad_evals
        score = None
        if evaluate is not None:
            if set_train_mode:
                set_train_mode(False)
            score = float(evaluate())
            if set_train_mode:
                set_train_mode(True)
            improved = result.best_score is None or score > result.best_score
            if improved:
                result.best_score, result.best_step, bad_evals = score, result.steps, 0
                best_state = get_state() if get_state else None
            else:
                bad_evals += 1
        result.history.append({"step": result.steps, "epoch": round(epoch + micro / micro_per_epoch, 3),
                               "loss": window_loss(), "valid": score,
                               "seconds": round(time.perf_counter() - started, 2)})
        log(f"step {result.steps} epoch {epoch + micro / micro_per_epoch:.2f} loss {window_loss():.4f}"
            + (f" valid {score:.4f} (best {result.best_score:.4f} @ {result.best_step})" if score is not None else ""))
        stop = bool(config.patience) and evaluate is not None and bad_evals >= config.patience
        return stop

    def window_loss() -> float:
        recent = losses[-max(1, steps_per_epoch):]
        return float(sum(recent) / len(recent)) if recent else float("nan")

    def save(finished: bool = False) -> None:
        if checkpointer is None:
            return
        result.seconds = time.perf_counter() - started
        checkpointer.save({
            "state": get_state() if get_state else None, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "result": result.as_dict(),
            "best_state": best_state, "bad_evals": bad_evals, "epoch": epoch, "micro": micro, "finished": finished,
            "losses": losses[-max(1, steps_per_epoch):],
        })

    if set_train_mode:
        set_train_mode(True)
    stop = False
    accumulated, pending = 0.0, 0
    while epoch < config.epochs and not stop:
        order = list(range(len(examples)))
        random.Random(config.seed * 100_003 + epoch).shuffle(order)
        while micro < micro_per_epoch:
            batch = [examples[i] for i in order[micro * config.batch_size:(micro + 1) * config.batch_size]]
            out = loss_fn(batch)
            loss, n_tokens = out if isinstance(out, tuple) else (out, 0)
            (loss / config.grad_accum).backward()
            accumulated += float(loss.detach())
            pending += 1
            result.tokens += int(n_tokens)
            micro += 1
            if pending == config.grad_accum or micro == micro_per_epoch:
                if processes is not None:
                    processes.average_gradients(parameters)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(accumulated / pending)
                accumulated, pending = 0.0, 0
                result.steps += 1
                at_cap = bool(config.max_steps) and result.steps >= config.max_steps
                if config.eval_every and result.steps % config.eval_every == 0 and micro < micro_per_epoch:
                    stop = do_eval()
                    save()
                if at_cap:
                    stop = True
                if stop:
                    break
        if micro >= micro_per_epoch:
            epoch, micro = epoch + 1, 0
            result.epochs_run = epoch
            stop = do_eval() or stop
            save()
        else:
            result.epochs_run = round(epoch + micro / micro_per_epoch, 3)
    result.stopped_early = stop and not (config.max_steps and result.steps >= config.max_steps)
    if set_train_mode:
        set_train_mode(False)
    if best_state is not None and set_state:
        set_state(best_state)
    result.seconds = time.perf_counter() - started
    save(finished=True)
    return result


def train_lora(backbone, examples: Sequence[tuple[str, str]], config: TrainConfig,
               evaluate: Callable[[], float] | None = None, checkpointer: Checkpointer | None = None,
               answer_only: bool = True, loss: str = "lm", yes: str = "Yes", no: str = "No",
               log: Callable[[str], None] = lambda m: None, processes=None) -> TrainResult:
    """LoRA instruction tuning on (prompt, answer) pairs; the backbone must already carry LoRA (`add_lora`).

    loss="lm": causal-LM loss on the answer tokens (`answer_only=False`: on every token, as the reference
    code does); loss="bce": binary cross-entropy on logit(yes) - logit(no), labels = answer starts with yes."""
    if not backbone.is_peft:
        raise InputError("train_lora: call backbone.add_lora(...) first")
    if loss not in ("lm", "bce"):
        raise InputError(f"train.loss must be 'lm' or 'bce', got {loss!r}")
    yes_id = backbone.answer_token_id(yes)

    def loss_fn(batch):
        prompts = [p for p, _ in batch]
        answers = [a for _, a in batch]
        if loss == "bce":
            labels = torch.tensor([backbone.answer_token_id(a) == yes_id for a in answers], dtype=torch.float32)
            n_tokens = sum(backbone.count_tokens(p) for p in prompts)
            return backbone.yes_no_bce(prompts, labels, yes=yes, no=no), n_tokens
        value, _ = backbone.lm_loss(prompts, answers, answer_only=answer_only)
        n_tokens = sum(backbone.count_tokens(p) + len(backbone.tokenize_piece(a)) for p, a in batch)
        return value, n_tokens

    return train_loop(backbone.trainable_parameters(), list(examples), loss_fn, config, evaluate=evaluate,
                      get_state=backbone.adapter_state, set_state=backbone.set_adapter_state,
                      checkpointer=checkpointer, log=log, set_train_mode=backbone.model.train,
                      processes=processes)
