"""Range checks of a CF model's `model` and `train` settings, before anything is built or written.

Shared by every method that trains a CF model (the CF baselines, CoLLM's CF step): a value the model or the
optimiser cannot take (a zero size, a NaN learning rate, a dropout of 1) is one InputError naming the key.
"""

from __future__ import annotations

import math
from recalign.errors import InputError

# keys that may be 0 (their meaning at 0 is documented beside TRAIN_DEFAULTS)
_TRAIN_MIN = {"epochs": 1, "batch_size": 1, "eval_every": 1, "patience": 0, "bce_negatives": 0}
_PROBABILITIES = ("dropout", "uncond_prob")


def check_model_settings(model: dict, prefix: str = "model") -> None:
    """Integer sizes >= 1 (seeds >= 0), every float finite, dropouts in [0, 1), weights >= 0."""
    for key, value in model.items():
        where = f"{prefix}.{key}"
        if isinstance(value, dict):
            check_model_settings(value, where)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        elif isinstance(value, int):
            low = 0 if key.endswith("seed") else 1
            if value < low:
                raise InputError(f"{where}: must be >= {low}, got {value}")
        elif not math.isfinite(value):
            raise InputError(f"{where}: must be a finite number, got {value}")
        elif key.endswith(_PROBABILITIES) and not 0 <= value < 1:
            raise InputError(f"{where}: must be in [0, 1), got {value}")
        elif ("weight" in key or key.startswith("reg")) and value < 0:
            raise InputError(f"{where}: must be >= 0, got {value}")
    heads, size = model.get("n_heads"), model.get("embedding_size")
    if isinstance(heads, int) and isinstance(size, int) and heads >= 1 and size % heads:
        raise InputError(f"{prefix}.n_heads: must divide {prefix}.embedding_size ({size}), got {heads}")


_TRAIN_FLOATS = {"lr": (lambda x: x > 0, "> 0"), "weight_decay": (lambda x: x >= 0, ">= 0"),
                 "max_minutes": (lambda x: x >= 0, ">= 0")}


def check_train_settings(train: dict, prefix: str = "train") -> None:
    for key, low in _TRAIN_MIN.items():
        if key in train and train[key] < low:
            raise InputError(f"{prefix}.{key}: must be >= {low}, got {train[key]}")
    for key, (ok, rule) in _TRAIN_FLOATS.items():
        if key in train and not (math.isfinite(train[key]) and ok(train[key])):
            raise InputError(f"{prefix}.{key}: must be a finite number {rule}, got {train[key]}")
