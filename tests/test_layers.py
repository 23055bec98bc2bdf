"""The layer map of docs/architecture.md, enforced: a module imports only its own package, the foundation
and the layers below it; no method imports another method; nothing below methods/ imports runs."""

from __future__ import annotations

import ast
from pathlib import Path

import recalign

ROOT = Path(recalign.__file__).parent
# lowest first; packages on one level do not import each other
LAYERS = [
    {"errors", "io", "progress", "assets", "config", "distributed"},  # foundation: every layer may use it
    {"data", "eval", "report"},  # report: Markdown/HTML tables and plots from metrics dicts
    {"tasks"},
    {"cf", "llm"},
    {"methods"},
    {"runner", "runs"},
    {"cli", "serve", "__main__"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
SAME_LEVEL_ALLOWED = {("runner", "runs"), ("cli", "serve"), ("__main__", "cli")}  # the CLI starts the server


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("recalign."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "recalign":
                out.update(f"recalign.{alias.name}" for alias in node.names)
            elif module.startswith("recalign."):
                out.add(module)
    return out


def _top(module: str) -> str:
    return module.split(".")[1]


def test_every_package_is_on_the_map():
    names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.stem != "__init__"}
    assert names <= set(LEVEL), f"not on the layer map: {sorted(names - set(LEVEL))}"


def test_layers_import_only_downwards():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        own = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for module in _imports(path):
            target = _top(module)
            if target == own or LEVEL[target] == 0:
                continue
            if LEVEL[target] > LEVEL[own] or (LEVEL[target] == LEVEL[own] and (own, target) not in SAME_LEVEL_ALLOWED):
                problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not problems, "\n".join(problems)


def test_no_method_imports_another_method():
    shared = {"__init__", "api"}
    methods = {p.stem for p in (ROOT / "methods").glob("*.py")} - shared
    problems = []
    for path in (ROOT / "methods").glob("*.py"):
        for module in _imports(path):
            parts = module.split(".")
            if len(parts) > 2 and parts[1] == "methods" and parts[2] in methods and parts[2] != path.stem:
                problems.append(f"{path.name} imports {module}")
    assert not problems, "\n".join(problems)


def test_the_check_itself_sees_a_forbidden_import(tmp_path):
    fake = ROOT / "tasks" / "_layer_probe.py"
    fake.write_text("from recalign.methods import bigrec\n")
    try:
        try:
            test_layers_import_only_downwards()
        except AssertionError as exc:
            assert "tasks/_layer_probe.py imports recalign.methods" in str(exc)
        else:
            raise AssertionError("a forbidden import was not detected")
    finally:
        fake.unlink()
