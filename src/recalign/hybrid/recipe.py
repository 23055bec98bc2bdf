"""Pieces shared by the hybrid-prompt methods (CoLLM, Soft-Prompt): prompt rendering with placeholder
slots, the text-only LoRA step, training slot-filling modules with the LLM frozen, and cached evaluation.

A prompt template is {"instruction", "input"} with `str.format` fields {liked} (quoted titles of the
user's last liked items), {target} (the target's title), {noun} / {nouns} (the domain noun), and may
contain placeholder slots such as "<UserID>" that `Backbone` fills with embeddings.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from recalign.errors import InputError
from recalign.hybrid.protocol import warm_cold_metrics
from recalign.llm import MODEL_CONFIG, Backbone, Checkpointer, LoraSettings, TrainConfig, Wrapper, fill, quote_titles
from recalign.llm import train_loop, train_lora

MODEL_DEFAULTS = dict(MODEL_CONFIG)
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
TRAIN_KEYS = ("epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule",
              "max_grad_norm", "eval_every", "patience", "max_steps")


class Prompter:
    """Renders one prompt per sample row from a template (config) and the dataset's titles."""

    def __init__(self, backbone: Backbone, template: Mapping, titles: Sequence[str], noun: str,
                 wrapper: str = "auto", system: str | None = "", empty_history: str = "none",
                 where: str = "prompt", require: Sequence[str] = (), forbid: Sequence[str] = ()):
        for key in ("instruction", "input"):
            if not isinstance(template.get(key), str):
                raise InputError(f"{where}.{key}: expected a string template")
        text = template["instruction"] + template["input"]
        for slot in require:
            if text.count(slot) != 1:
                raise InputError(f"{where}: the template must contain the placeholder {slot} exactly once "
                                 f"(found {text.count(slot)})")
        for slot in forbid:
            if slot in text:
                raise InputError(f"{where}: the text-only template must not contain the placeholder {slot}")
        self.template, self.titles, self.noun = template, titles, noun
        self.empty_history, self.where = empty_history, where
        self.wrap = Wrapper(wrapper, system=system, tokenizer=backbone.tokenizer)
        self.render_row(0, (), where)  # fail early on unknown template fields

    def render_row(self, target: int, history: Sequence[int], where: str | None = None) -> str:
        liked = quote_titles([self.titles[i] for i in history]) if len(history) else self.empty_history
        fields = {"liked": liked, "target": self.titles[target], "noun": self.noun, "nouns": f"{self.noun}s"}
        where = where or self.where
        return self.wrap(fill(self.template["instruction"], f"{where}.instruction", **fields),
                         fill(self.template["input"], f"{where}.input", **fields))

    def __call__(self, frame: pd.DataFrame) -> list[str]:
        return [self.render_row(int(t), h) for t, h in zip(frame["item"], frame["history"])]


def load_backbone(section: Mapping) -> Backbone:
    return Backbone.from_config(section)


def train_config(section: Mapping, seed: int, where: str) -> TrainConfig:
    unknown = sorted(set(section) - set(TRAIN_KEYS) - {"loss", "init_from"})
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return TrainConfig.from_config({k: v for k, v in section.items() if k in TRAIN_KEYS}, seed=seed)


def labels_of(frame: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(frame["label"].to_numpy(bool), dtype=torch.float32)


class Evaluator:
    """Scores sample sets and turns scores into AUC / UAUC on all / warm / cold; results are cached in
    the run directory (so a resumed run does not score a set twice)."""

    def __init__(self, run, backbone: Backbone, yes: str, no: str, batch_size: int | None, log):
        self.run, self.backbone, self.yes, self.no = run, backbone, yes, no
        self.batch_size, self.log = batch_size, log
        self.seconds = 0.0

    def scores(self, prompts: list[str], slots: Mapping[str, torch.Tensor] | None = None,
               progress: str | None = None) -> np.ndarray:
        started = time.perf_counter()
        out = self.backbone.score_yes_no(prompts, yes=self.yes, no=self.no, slots=slots,
                                         batch_size=self.batch_size, progress=progress).numpy()
        self.seconds += time.perf_counter() - started
        return out

    def cached(self, name: str, frame: pd.DataFrame, compute: Callable[[], np.ndarray]) -> dict:
        """Metrics of `compute()`'s scores on `frame`, with the scores kept as checkpoint `eval-NAME`."""
        saved = self.run.load_checkpoint(f"eval-{name}") if getattr(self.run, "resume", False) else None
        if saved is not None and len(saved["scores"]) == len(frame):
            scores = saved["scores"]
        else:
            scores = compute()
            self.run.save_checkpoint(f"eval-{name}", {"scores": scores, "seconds": self.seconds})
        metrics = warm_cold_metrics(frame, scores)
        self.log(f"{name}: auc {metrics['auc']:.4f} uauc {metrics['uauc']:.4f}"
                 + (f" | warm auc {metrics['auc_warm']:.4f} cold auc {metrics['auc_cold']:.4f}"
                    if "auc_warm" in metrics else ""))
        return metrics


def text_lora_step(ctx, backbone: Backbone, cfg: Mapping, lora: Mapping, train_prompts: list[str],
                   train_labels: torch.Tensor, valid_prompts: list[str], valid_frame: pd.DataFrame,
                   evaluator: Evaluator, name: str = "step1") -> dict:
    """Step 1 of CoLLM (= TALLRec on CoLLM's text prompt): LoRA tuned on (prompt, Yes/No), early stopping on
    valid AUC. `init_from` (a peft adapter directory) loads a finished step 1 instead of training.
    Afterwards LoRA is frozen and saved to RUN/<name>_adapter/."""
    torch.manual_seed(ctx.seed)
    backbone.add_lora(LoraSettings.from_config(lora))
    started = time.perf_counter()
    init_from = cfg.get("init_from")
    if init_from:
        from pathlib import Path

        path = Path(init_from)
        if (path / f"{name}_adapter").is_dir():  # a run directory of a previous CoLLM run
            path = path / f"{name}_adapter"
        if not (path / "adapter_config.json").is_file():
            raise InputError(f"{name}.init_from: {init_from} is neither a peft adapter directory nor a run "
                             f"directory with {name}_adapter/")
        backbone.load_adapter(path)
        summary = {"loaded_from": str(path)}
        ctx.log(f"{name}: LoRA adapter loaded from {path}")
    else:
        config = train_config(cfg, ctx.seed, name)
        yes, no = evaluator.yes, evaluator.no
        examples = [(p, yes if bool(y) else no) for p, y in zip(train_prompts, train_labels.tolist())]

        def valid_auc() -> float:
            scores = evaluator.scores(valid_prompts)
            return _auc_or_zero(valid_frame, scores)

        result = train_lora(backbone, examples, config, evaluate=valid_auc, checkpointer=Checkpointer(ctx.run, name),
                            loss=cfg.get("loss", "bce"), yes=yes, no=no, log=ctx.log)
        summary = result.as_dict()
        backbone.save_adapter(ctx.run.path / f"{name}_adapter")
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    summary["seconds"] = time.perf_counter() - started
    return summary


def train_slot_modules(ctx, backbone: Backbone, modules: torch.nn.Module, config: TrainConfig,
                       n_train: int, loss_fn: Callable[[list[int]], torch.Tensor],
                       valid_auc: Callable[[], float], name: str) -> dict:
    """Train the parameters of `modules` that require a gradient; every other backbone weight (LoRA included)
    is frozen. The state of `modules` is what is checkpointed and restored (best valid AUC)."""
    own = {id(p) for p in modules.parameters() if p.requires_grad}
    for parameter in backbone.model.parameters():
        if id(parameter) not in own:
            parameter.requires_grad_(False)
    backbone.model.eval()  # no dropout in the frozen LLM; gradients still flow to the slot embeddings
    parameters = [p for p in modules.parameters() if p.requires_grad]
    started = time.perf_counter()
    result = train_loop(parameters, list(range(n_train)), loss_fn, config, evaluate=valid_auc,
                        get_state=lambda: {k: v.detach().clone() for k, v in modules.state_dict().items()},
                        set_state=modules.load_state_dict, checkpointer=Checkpointer(ctx.run, name),
                        log=ctx.log, set_train_mode=modules.train)
    summary = result.as_dict()
    summary["seconds"] = time.perf_counter() - started
    return summary


def _auc_or_zero(frame: pd.DataFrame, scores) -> float:
    from recalign.eval import auc

    value = auc(frame["label"].to_numpy(bool), scores)
    return 0.0 if value != value else value  # one-class valid set: no signal, keep the first state


def valid_auc_fn(frame: pd.DataFrame, score: Callable[[], np.ndarray]) -> Callable[[], float]:
    return lambda: _auc_or_zero(frame, score())
