"""bench/ uses the library's public layers only (issue #10, item 5): every bench script imports (without
running its main), and none reaches into a method module (`recalign.methods.<name>` other than the registry
and `recalign.methods.api`) or imports a `_private` name or module from recalign."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))
PUBLIC_METHODS_MODULES = {"recalign.methods", "recalign.methods.api"}
# `recalign.methods.bigrec.X`, `recalign.methods.tallrec.SCHEDULE`, ... anywhere in the source (also in strings
# handed to importlib); `recalign.methods.api.X` is the method contract and stays allowed
METHOD_INTERNAL = re.compile(r"\brecalign\.methods\.(?!api\b)[A-Za-z_]\w*\.")


def _violations(path: Path) -> list[str]:
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    problems = []

    def module_problem(module: str, line: int) -> None:
        if not module.startswith("recalign"):
            return
        if any(part.startswith("_") for part in module.split(".")):
            problems.append(f"line {line}: imports the private module {module}")
        if module.startswith("recalign.methods.") and module not in PUBLIC_METHODS_MODULES:
            problems.append(f"line {line}: imports the method module {module} (use recalign.methods.get_method / "
                            "all_experiments, or the tasks/llm/cf/eval layers)")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module_problem(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("recalign"):
            module = node.module
            module_problem(module, node.lineno)
            for alias in node.names:
                if alias.name.startswith("_"):
                    problems.append(f"line {node.lineno}: imports the private name {alias.name} from {module}")
                if module == "recalign.methods":
                    import recalign.methods

                    if alias.name not in recalign.methods.__all__:
                        problems.append(f"line {node.lineno}: imports {alias.name} from recalign.methods "
                                        f"(public: {', '.join(recalign.methods.__all__)})")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id == "recalign":
                problems.append(f"line {node.lineno}: uses the private attribute {node.attr} of recalign")
    for number, line in enumerate(source.splitlines(), 1):
        if METHOD_INTERNAL.search(line):
            problems.append(f"line {number}: reaches into a method module: {line.strip()}")
    return problems


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_uses_public_apis_only(path):
    problems = _violations(path)
    assert not problems, f"bench/{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_script_imports(path, monkeypatch):
    monkeypatch.setattr(os, "environ", os.environ.copy())  # scripts may setdefault env vars at import
    monkeypatch.syspath_prepend(str(BENCH))
    name = f"bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)  # __name__ is not "__main__": main() does not run
    assert callable(getattr(module, "main", None)), f"bench/{path.name} has no main()"


def _stale_imports(path: Path) -> list[str]:
    """`from recalign.X import name` whose module or name does not exist (e.g. the removed recalign.hybrid or
    recalign.llm.ctr): such a script fails only when the code path runs, which a bench run finds late."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("recalign")):
            continue
        try:
            module = importlib.import_module(node.module)
        except ImportError as exc:
            problems.append(f"line {node.lineno}: {node.module}: {exc}")
            continue
        for alias in node.names:
            if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                problems.append(f"line {node.lineno}: {node.module} has no {alias.name}")
    return problems


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_imports_resolve(path):
    problems = _stale_imports(path)
    assert not problems, f"bench/{path.name}:\n" + "\n".join(problems)


def test_the_check_catches_internals(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from recalign.methods.tallrec import SCHEDULE\n"
                   "from recalign.llm.backbone import _common_prefix_length\n"
                   "from recalign.methods import bigrec\n"
                   "import recalign.data.readers._common\n"
                   "def f():\n    import recalign\n    return recalign.methods.bigrec.ground, recalign.llm._x\n")
    problems = "\n".join(_violations(bad))
    for expected in ("method module recalign.methods.tallrec", "private name _common_prefix_length",
                     "imports bigrec from recalign.methods", "private module recalign.data.readers._common",
                     "reaches into a method module", "private attribute _x"):
        assert expected in problems, (expected, problems)
    good = tmp_path / "good.py"
    good.write_text("from recalign.methods import all_experiments, get_method\n"
                    "from recalign.methods.api import Experiment\nfrom recalign.tasks.ctr import ctr_report\n")
    assert _violations(good) == []
    stale = tmp_path / "stale.py"
    stale.write_text("from recalign.hybrid.protocol import build_ctr_data\nfrom recalign.llm import ctr, Prompter\n")
    problems = "\n".join(_stale_imports(stale))
    assert "recalign.hybrid.protocol" in problems and "recalign.llm has no ctr" in problems
    assert "Prompter" not in problems
