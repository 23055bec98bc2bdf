"""Property tests: random config keys and values (`--set` and config files) through the real entry points.

The contract on any config: it resolves (and then the run succeeds), or it is refused with one InputError
line naming the key — never another exception, never exit 1, never a run directory left that blocks the
corrected retry. Validation runs for every registered method without a dataset (fast); whole runs go
through the CLI for the cheap CF methods on a small fixture.

Bounded for CI: RECALIGN_PROPERTY_EXAMPLES (default 150 for validation, a fifth of it for whole runs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_helpers import invoke
from recalign import config as cfg
from recalign.errors import InputError
from recalign.methods import all_methods
from recalign.runner import resolve_config

EXAMPLES = int(os.environ.get("RECALIGN_PROPERTY_EXAMPLES", "150"))
SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
METHODS = {m.name: m for m in all_methods()}
KEYS = {name: sorted(cfg.flatten(cfg.merge_defaults(cfg.BASE_DEFAULTS, m.defaults), leaves=None))
        for name, m in METHODS.items()}
FIXTURE = Path(__file__).parent / "fixtures" / "recbole" / "tiny.inter"

# values as a user types them after `key=`: YAML scalars, odd numbers, lists, mappings, broken YAML
raw_values = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["0", "-1", "1", "2", "0.5", "-0.5", "1e9", "nan", ".nan", "inf", "-.inf", "true", "false",
                     "null", "~", "", "[]", "{}", "[1, 2]", "[0.0, 1.0]", "[-1]", "{a: 1}", "[", "{", "'", "x:",
                     "auto", "cpu", "cuda:7", "all", "liked", "ctr", "loo", "bce", "lm", "ndcg@0", "hr@x", "auc",
                     "tiny-random", "/nonexistent", "genre:Nope", "\x00", "é"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)


def key_strategy(name: str):
    keys = KEYS[name]
    return st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: k.rsplit(".", 1)[0]),
                     st.text(alphabet="abcxyz._", min_size=1, max_size=10))


@st.composite
def method_and_sets(draw, names=tuple(sorted(METHODS))):
    name = draw(st.sampled_from(names))
    sets = draw(st.lists(st.tuples(key_strategy(name), raw_values), min_size=1, max_size=3))
    return name, [f"{k}={v}" for k, v in sets]


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(method_and_sets())
def test_any_set_value_resolves_or_is_one_input_error(case):
    name, sets = case
    try:
        config = resolve_config(name, None, sets)
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert isinstance(config, dict) and config["seed"] >= 0


@settings(max_examples=max(10, EXAMPLES // 3), **SETTINGS)
@given(st.sampled_from(sorted(METHODS)), st.dictionaries(st.text(alphabet="abtrainepochslr._", min_size=1, max_size=8),
                                                         st.recursive(st.none() | st.integers() | st.text(max_size=4),
                                                                      lambda c: st.lists(c, max_size=2)
                                                                      | st.dictionaries(st.text(max_size=4), c,
                                                                                        max_size=2), max_leaves=4),
                                                         max_size=3))
def test_any_config_file_resolves_or_is_one_input_error(tmp_path_factory, name, tree):
    path = tmp_path_factory.mktemp("config") / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        resolve_config(name, str(path), None)
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(FIXTURE)


@settings(max_examples=max(8, EXAMPLES // 5), **SETTINGS)
@given(method_and_sets(names=("pop", "itemcf", "mf")))
def test_cheap_runs_exit_0_or_2_and_never_block_the_retry(monkeypatch, capsys, tmp_path_factory, dataset, case):
    name, sets = case
    out = tmp_path_factory.mktemp("run") / "out"
    extra = ["--set", "train.epochs=1"] if name == "mf" and not any(s.startswith("train.epochs=") for s in sets) else []
    args = ["run", name, "--dataset", dataset, "--out", str(out), *extra]
    for item in sets:
        args += ["--set", item]
    code, _, err = invoke(monkeypatch, capsys, *args)
    assert code in (0, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        # the corrected retry (defaults) is never blocked by what the failed run left
        code, _, err = invoke(monkeypatch, capsys, "run", name, "--dataset", dataset, "--out", str(out),
                              *(["--set", "train.epochs=1"] if name == "mf" else []))
        assert code == 0, err
    shutil.rmtree(out.parent, ignore_errors=True)
