"""Method registry: one module per paper method (plus `cf_baseline`, which runs every CF model of
`recalign.cf.MODELS` as a method). Each module exposes `METHODS: list[Method]` and `EXPERIMENTS`
(`recalign.methods.api`); a module file in this package is registered by existing. Modules are imported
on first use, so `recalign data ...` does not load torch.
"""

from __future__ import annotations

import importlib

from recalign.errors import InputError
from recalign.methods.api import Experiment, Method, RunContext, RunResult

# the order `recalign reproduce` runs experiments in; any other module in this package comes after these
ORDER: list[str] = ["cf_baseline", "icl", "tallrec", "bigrec", "collm", "softprompt"]


def modules() -> list[str]:
    """Every method module of this package (a new file registers itself by existing)."""
    import pkgutil

    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "api" and not m.name.startswith("_"))
    return [m for m in ORDER if m in found] + [m for m in found if m not in ORDER]


def registry() -> dict[str, str]:
    """Every method name -> its module (imports the method modules)."""
    from recalign.cf import MODELS

    out = {name: "cf_baseline" for name in MODELS}
    for module in modules():
        if module != "cf_baseline":
            out.update({method.name: module for method in _module(module).METHODS})
    return out


def _module(name: str):
    return importlib.import_module(f"recalign.methods.{name}")


def get_method(name: str) -> Method:
    from recalign.cf import MODELS

    module = "cf_baseline" if name in MODELS else name if name in modules() else registry().get(name)
    if module is None:
        raise InputError(f"unknown method '{name}'; known methods: {', '.join(sorted(registry()))}")
    found = [m for m in _module(module).METHODS if m.name == name]
    if not found:
        raise InputError(f"unknown method '{name}'; known methods: {', '.join(sorted(registry()))}")
    return found[0]


def all_methods() -> list[Method]:
    return [method for module in modules() for method in _module(module).METHODS]


def all_experiments() -> list[Experiment]:
    return [exp for module in modules() for exp in _module(module).EXPERIMENTS]


__all__ = ["Experiment", "Method", "RunContext", "RunResult", "all_experiments", "all_methods", "get_method",
           "modules", "registry"]
