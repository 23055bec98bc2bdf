"""The whole registry, end to end: every registered method runs on the tiny random Llama (LLM methods) and
a small slice of ML-100K (the first 80 users' interactions, RecBole atomic files) in seconds, writes a
valid metrics.json and resumes to the same numbers. A method added to the registry is tested here with no
other edit (its `Method.smoke` overrides make it small)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from recalign.data import canonical_dataset
from recalign.methods import all_methods
from recalign.runner import run_method

METHODS = {method.name: method for method in all_methods()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from recalign import assets

    source = assets.fetch("ml-100k")
    out = tmp_path_factory.mktemp("small")
    lines = (source / "ml-100k.inter").read_text().splitlines()
    rows = [line for line in lines[1:] if int(line.split("\t")[0]) <= 80]
    (out / "small.inter").write_text("\n".join([lines[0], *rows]) + "\n")
    (out / "small.item").write_text((source / "ml-100k.item").read_text())
    return str(out / "small.inter")


def _sets(method) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in method.smoke.items()]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_writes_metrics_and_resumes(name, small, tmp_path):
    method = METHODS[name]
    sets = _sets(method)
    if "grounding" in method.defaults:
        sets.append(f"grounding.cache_dir={tmp_path / 'cache'}")
    out = tmp_path / "run"
    metrics = run_method(name, small, out, sets=sets)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == name and saved["dataset"] == canonical_dataset(small)  # recorded absolute
    assert saved["test"] and {"train", "eval", "total"} <= set(saved["seconds"])
    # accuracy metrics, or the similarity metrics of an audit (fairllm: jaccard@K, ...)
    headline = [v for k, v in saved["test"].items()
                if k.split("@")[0] in ("auc", "uauc", "ndcg", "hr", "jaccard", "serp", "prag") and not k.endswith("_ci")]
    intervals = [v for k, v in saved["test"].items()  # of the rate metrics (popularity@10 is a mean log count)
                 if k.endswith("_ci") and k.split("@")[0].split("_")[0] in ("auc", "uauc", "ndcg", "hr", "jaccard",
                                                                             "serp", "prag")]
    assert all(v is None or (len(v) == 2 and 0.0 <= v[0] <= v[1] <= 1.0) for v in intervals)
    assert headline and all(v is None or (isinstance(v, float) and 0.0 <= v <= 1.0) for v in headline)
    assert any(v is not None and not math.isnan(v) for v in headline)
    assert (out / "report.md").is_file() and (out / "config.yaml").is_file()
    cases = json.loads((out / "cases-test.json").read_text()) if (out / "cases-test.json").is_file() else []
    if cases and "rank" in cases[0]:  # next-item rankings: one user representation, so that runs pair
        assert all(isinstance(row["user"], int) for row in cases)
    if "model" in method.defaults and "name" in method.defaults["model"]:  # an LLM method says its dtype and why
        assert saved["precision"]["dtype"] in ("float32", "bfloat16", "float16") and saved["precision"]["reason"]
    (out / "metrics.json").unlink()
    again = run_method(name, small, out, sets=sets, resume=True)
    assert json.dumps(again["test"], sort_keys=True) == json.dumps(metrics["test"], sort_keys=True)
