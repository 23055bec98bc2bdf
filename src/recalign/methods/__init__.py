"""Method registry: one module per paper method (plus `cf_baseline`, which runs every CF model of
`recalign.cf.MODELS` as a method). Each module exposes `METHODS: list[Method]` and `EXPERIMENTS`
(`recalign.methods.api`). Modules are imported on first use, so `recalign data ...` does not load torch.
"""

from __future__ import annotations

import importlib

from recalign.errors import InputError
from recalign.methods.api import Experiment, Method, RunContext, RunResult

# method modules, in the order `recalign reproduce` runs their experiments
MODULES: list[str] = ["cf_baseline", "icl", "tallrec", "bigrec", "collm", "softprompt"]
# the LLM methods' names -> module (the CF names come from recalign.cf.MODELS)
LLM_METHODS: dict[str, str] = {"icl": "icl", "tallrec": "tallrec", "bigrec": "bigrec", "collm": "collm",
                               "softprompt": "softprompt"}


def registry() -> dict[str, str]:
    """Every method name -> its module."""
    from recalign.cf import MODELS

    return {**{name: "cf_baseline" for name in MODELS}, **LLM_METHODS}


def _module(name: str):
    return importlib.import_module(f"recalign.methods.{name}")


def get_method(name: str) -> Method:
    known = registry()
    if name not in known:
        raise InputError(f"unknown method '{name}'; known methods: {', '.join(sorted(known))}")
    return next(m for m in _module(known[name]).METHODS if m.name == name)


def all_methods() -> list[Method]:
    return [method for module in MODULES for method in _module(module).METHODS]


def all_experiments() -> list[Experiment]:
    return [exp for module in MODULES for exp in _module(module).EXPERIMENTS]


__all__ = ["Experiment", "Method", "RunContext", "RunResult", "all_experiments", "all_methods", "get_method",
           "registry"]
