"""Method registry. Each method lives in its own module and exposes `METHOD = Method(...)`.

Modules are imported lazily so that `recalign data ...` does not load torch/transformers.
A module may also expose `EXPERIMENTS`: a list of `Experiment` that `recalign reproduce` runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from recalign.errors import InputError

# method name -> module path (relative to recalign.methods unless dotted)
REGISTRY: dict[str, str] = {
    "pop": "cf_baseline",
    "usercf": "cf_baseline",
    "itemcf": "cf_baseline",
    "mf": "cf_baseline",
    "fism": "cf_baseline",
    "lightgcn": "cf_baseline",
    "gru4rec": "cf_baseline",
    "caser": "cf_baseline",
    "sasrec": "cf_baseline",
    "icl": "icl",
    "tallrec": "tallrec",
    "bigrec": "bigrec",
    "collm": "collm",
    "softprompt": "softprompt",
}

# modules whose EXPERIMENTS are collected by `recalign reproduce` (in this order)
EXPERIMENT_MODULES: list[str] = ["cf_baseline", "icl", "tallrec", "bigrec", "collm", "softprompt"]


@dataclass
class Method:
    name: str
    description: str
    defaults: dict
    run: Callable[["RunContext"], dict]  # returns {"test": {...}, "valid": {...}, "seconds": {...}, ...}
    report: Callable[[dict], str] | None = None  # extra Markdown for report.md
    validate: Callable[[dict], None] | None = None  # raise InputError before anything is written


@dataclass
class Experiment:
    """One registered experiment of the seed's tables, in miniature."""

    name: str  # unique, used as the sub-directory
    method: str
    dataset: str = "ml-100k"
    table: str = ""  # which seed table / claim it belongs to
    quick: dict[str, Any] = field(default_factory=dict)  # --set overrides for the quick profile
    full: dict[str, Any] = field(default_factory=dict)  # ... for the full profile
    profiles: tuple[str, ...] = ("quick", "full")


def _module(path: str):
    return importlib.import_module(path if "." in path else f"recalign.methods.{path}")


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise InputError(f"unknown method '{name}'; known methods: {', '.join(sorted(REGISTRY))}")
    module = _module(REGISTRY[name])
    methods = getattr(module, "METHODS", None) or {module.METHOD.name: module.METHOD}
    return methods[name]


def all_experiments() -> list[Experiment]:
    experiments = []
    for path in EXPERIMENT_MODULES:
        experiments.extend(getattr(_module(path), "EXPERIMENTS", []))
    return experiments


@dataclass
class RunContext:
    """What a method's `run` receives."""

    method: str
    dataset_name: str
    config: dict
    run: Any  # recalign.runs.RunDir
    _dataset: Any = None

    @property
    def dataset(self):
        if self._dataset is None:
            from recalign.data import load_dataset

            data = self.config["data"]
            self._dataset = load_dataset(
                self.dataset_name, fmt=data["format"], like_threshold=data["like_threshold"],
                k_core_users=data["k_core_users"], k_core_items=data["k_core_items"], domain=data["domain"],
            )
        return self._dataset

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def log(self, message: str) -> None:
        from recalign.progress import log

        self.run.log(message)
        log(message)
