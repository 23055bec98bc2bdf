"""`recalign serve`: finished runs served over HTTP.

Tiny runs are made here on a slice of ML-100K (the first 80 users): MF (CTR protocol, 1 epoch), SASRec (1
epoch), TALLRec, CoLLM and BIGRec on the tiny random Llama. The tests check real behaviour: CF top-k equals
`cf.recommend`, scores equal the model's own (CF) or `score_yes_no` on the run's own prompts (TALLRec), the
served LLMs reproduce their run's test AUC, concurrent requests are merged into one forward pass with the
same answers, the router's decisions, one-line 4xx messages naming the field, refused run directories, a
real uvicorn server, and a bounded fuzzer that never gets a 5xx.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from recalign.errors import InputError  # noqa: E402
from recalign.methods import get_method  # noqa: E402
from recalign.runner import run_method  # noqa: E402
from recalign.serve import LoadOptions, Router, create_app, evaluate_routing, load_runs, routing_markdown  # noqa: E402
from recalign.serve.app import Settings  # noqa: E402
from recalign.serve.batching import MicroBatcher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _sets(method: str, **extra) -> list[str]:
    values = {**get_method(method).smoke, **extra}
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from recalign import assets

    source = assets.fetch("ml-100k")
    root = tmp_path_factory.mktemp("serve")
    lines = (source / "ml-100k.inter").read_text().splitlines()
    rows = [line for line in lines[1:] if int(line.split("\t")[0]) <= 80]
    (root / "small.inter").write_text("\n".join([lines[0], *rows]) + "\n")
    (root / "small.item").write_text((source / "ml-100k.item").read_text())
    data = str(root / "small.inter")
    out = {"root": root, "data": data}
    specs = {"mf": _sets("mf", protocol="ctr"), "sasrec": _sets("sasrec"), "tallrec": _sets("tallrec"),
             "collm": _sets("collm"), "bigrec": _sets("bigrec") + [f"grounding.cache_dir={root / 'grounding'}"]}
    for name, sets in specs.items():
        run_method(name, data, root / name, sets=sets)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def loaded(runs):
    models = load_runs([runs[n] for n in ("mf", "tallrec", "sasrec", "collm", "bigrec")],
                       LoadOptions(max_batch=64, max_wait_ms=5))
    return {m.name: m for m in models}


@pytest.fixture(scope="module")
def client(loaded):
    models = list(loaded.values())
    app = create_app(models, Router(models, "auto"), Settings(max_items=64))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _raw_items(catalog, dense):
    return [catalog.item_raw[int(i)] for i in dense]


# --------------------------------------------------------------------------------------------- answers
def test_cf_top_k_and_scores_equal_the_model(client, loaded):
    from recalign.cf import make_query, recommend

    mf = loaded["mf"]
    cat = mf.catalog
    user = cat.user_index["3"]
    log, _ = cat.user_log(user)
    query = make_query([user], [log], mf.model.n_items, mf.model.max_len)
    scores, items = recommend(mf.model, query, 7, full_histories=[log])
    got = client.post("/recommend", json={"user": "3", "k": 7, "model": "mf"}).json()
    assert got["model"] == "mf" and got["candidates"] == "catalogue"
    assert [r["item"] for r in got["items"]] == _raw_items(cat, items[0])
    assert np.allclose([r["score"] for r in got["items"]], scores[0].numpy(), atol=1e-6)
    assert not set(r["item"] for r in got["items"]) & set(_raw_items(cat, log))  # seen items excluded
    assert got["items"][0]["title"] == cat.titles[int(items[0, 0])]

    asked = ["1", "50", "181"]
    dense = [cat.item_index[i] for i in asked]
    expected = mf.model.score(query, torch.tensor(dense))[0].detach().numpy()
    got = client.post("/score", json={"user": 3, "items": [1, 50, 181], "model": "mf"}).json()  # integer ids read as strings
    assert [r["item"] for r in got["scores"]] == asked
    assert np.allclose([r["score"] for r in got["scores"]], expected, atol=1e-6)

    sas = loaded["sasrec"]  # a sequential model answers a history without a user
    history = ["50", "181", "1"]
    q = make_query([-1], [[cat.item_index[i] for i in history]], sas.model.n_items, sas.model.max_len)
    s, it = recommend(sas.model, q, 5)
    got = client.post("/recommend", json={"history": history, "k": 5, "model": "sasrec"}).json()
    assert got["model"] == "sasrec" and got["route"] == {"mode": "model", "reason": "requested by name"}
    assert [r["item"] for r in got["items"]] == _raw_items(cat, it[0])
    got = client.post("/recommend", json={"history": history, "k": 5, "model": "sasrec", "exclude_seen": False,
                                          "candidates": ["1", "2", "3"]}).json()
    assert got["candidates"] == "request" and {r["item"] for r in got["items"]} == {"1", "2", "3"}


def test_tallrec_scores_equal_score_yes_no_on_the_runs_prompts(client, runs, loaded):
    import pandas as pd

    from recalign.llm import Backbone
    from recalign.methods.tallrec import prompts_of

    cfg = yaml.safe_load((runs["tallrec"] / "config.yaml").read_text())
    served = loaded["tallrec"]
    cat = served.catalog
    backbone = Backbone.from_config(cfg["model"])
    backbone.load_adapter(runs["tallrec"] / "checkpoints" / "adapter-seed0")
    history, liked = ["50", "181", "1", "7"], [True, False, True, True]
    items = ["100", "258", "286"]
    frame = pd.DataFrame({"user": [-1] * 3, "history": [tuple(cat.item_index[i] for i in history)] * 3,
                          "history_labels": [tuple(liked)] * 3, "item": [cat.item_index[i] for i in items]})
    prompts = prompts_of(backbone, cfg["prompt"], cat.ds, frame, cat.ds.domain)
    expected = backbone.score_yes_no(prompts, cfg["prompt"]["yes"], cfg["prompt"]["no"]).numpy()
    got = client.post("/score", json={"history": history, "liked": liked, "items": items}).json()
    assert got["model"] == "tallrec" and got["route"]["reason"].startswith("cold user")
    assert np.allclose([r["score"] for r in got["scores"]], expected, atol=1e-4)


def test_served_llms_reproduce_their_runs_test_auc(runs, loaded):
    """Scoring each run's own test samples through the served model gives the AUC in its metrics.json."""
    from recalign.tasks.ctr import collm_protocol, ctr_report, tallrec_protocol

    for name in ("tallrec", "collm"):
        served = loaded[name]
        cfg = served.config
        ds = served.catalog.ds
        data = (collm_protocol(ds, cfg["data_protocol"], cfg["seed"]) if name == "collm"
                else tallrec_protocol(ds, cfg["samples"]))
        labels = data.test["history_labels"] if name == "tallrec" else [None] * len(data.test)
        rows = [(int(u), tuple(h), tuple(hl) if hl is not None else (True,) * len(h), int(i))
                for u, h, hl, i in zip(data.test["user"], data.test["history"], labels, data.test["item"])]
        scores = served.run_rows(rows)  # what the batcher calls with a batch of rows
        expected = json.loads((runs[name] / "metrics.json").read_text())["test"]["auc"]
        assert ctr_report(data.test, np.asarray(scores))["auc"] == pytest.approx(expected, abs=1e-9), name


def test_bigrec_recommends_the_items_nearest_to_its_generation(client, loaded):
    got = client.post("/recommend", json={"user": "5", "k": 5, "model": "bigrec"}).json()
    assert got["model"] == "bigrec" and got["candidates"] == "catalogue" and isinstance(got["generated"], str)
    assert len(got["items"]) == 5
    scores = [r["score"] for r in got["items"]]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)  # -L2 distance
    again = client.post("/score", json={"user": "5", "items": [r["item"] for r in got["items"]],
                                        "model": "bigrec"}).json()
    assert np.allclose([r["score"] for r in again["scores"]], scores, atol=1e-4)


def test_collm_answers_a_known_user_and_a_bare_history(client):
    for body in ({"user": "2", "items": ["1", "2"]}, {"history": ["1", "2"], "items": ["3"]}):
        got = client.post("/score", json={**body, "model": "collm"})
        assert got.status_code == 200 and all(isinstance(r["score"], float) for r in got.json()["scores"])
    got = client.post("/recommend", json={"user": "2", "k": 4, "model": "collm"}).json()
    assert got["candidates"] == "popular-50" and len(got["items"]) == 4


# -------------------------------------------------------------------------------------------- batching
def test_micro_batcher_merges_concurrent_requests_and_drains_on_close():
    calls = []

    def fn(rows):
        calls.append(list(rows))
        time.sleep(0.02)
        return [r * 10 for r in rows]

    async def main():
        batcher = MicroBatcher(fn, max_batch=8, max_wait_ms=50)
        jobs = [batcher.submit([i, i + 100]) for i in range(7)]
        results = await asyncio.gather(*jobs)
        late = asyncio.ensure_future(batcher.submit([5]))
        await asyncio.sleep(0)
        await batcher.close()  # the queued request is still answered
        return results, await late

    results, late = asyncio.run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(7)] and late == [50]
    assert all(len(c) <= 8 for c in calls) and len(calls) < 7 + 1  # merged, never over max_batch
    assert max(len(c) for c in calls) == 8


def test_concurrent_llm_requests_share_a_forward_pass_with_the_answers_they_get_alone(loaded):
    served = loaded["tallrec"]
    models = [served]
    bodies = [{"history": ["50", "181"][: 1 + i % 2], "items": [str(10 + i), str(20 + i)]} for i in range(6)]
    app = create_app(models, Router(models, "auto"))
    with TestClient(app) as c:
        alone = [c.post("/score", json=b).json()["scores"] for b in bodies]
        before = served.batcher.batches
        served.batcher.max_wait = 0.3  # long enough for all six to arrive (they are answered when it fills)
        try:
            with ThreadPoolExecutor(6) as pool:
                together = list(pool.map(lambda b: c.post("/score", json=b).json()["scores"], bodies))
        finally:
            served.batcher.max_wait = 0.005
        merged = served.batcher.batches - before
        metrics = c.get("/metrics").text
    assert merged < len(bodies)  # at least two requests went through one forward pass
    for a, b in zip(alone, together):
        assert [r["item"] for r in a] == [r["item"] for r in b]
        assert np.allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-4)
    assert 'recalign_batch_requests_bucket{le="1.0",model="tallrec"}' in metrics
    count = [line for line in metrics.splitlines() if line.startswith('recalign_batch_requests_sum{model="tallrec"}')]
    assert count and float(count[0].split()[-1]) >= 12  # 6 alone + 6 together


# ---------------------------------------------------------------------------------------------- router
def test_router_sends_warm_requests_to_cf_and_cold_ones_to_the_llm(client, loaded):
    mf = loaded["mf"]
    warm_user = next(raw for u, raw in enumerate(mf.catalog.user_raw) if mf.train_user_counts[u] >= 1)
    cold_items = np.flatnonzero(mf.train_item_counts == 0)
    warm_item = mf.catalog.item_raw[int(np.argmax(mf.train_item_counts))]
    got = client.post("/score", json={"user": warm_user, "items": [warm_item]}).json()
    assert got["model"] == "mf" and got["route"]["reason"].startswith("warm")
    got = client.post("/score", json={"history": [warm_item], "items": [warm_item]}).json()
    assert got["model"] == "tallrec" and "no user id" in got["route"]["reason"]
    if len(cold_items):
        cold = mf.catalog.item_raw[int(cold_items[0])]
        got = client.post("/score", json={"user": warm_user, "items": [warm_item, cold]}).json()
        assert got["model"] == "tallrec" and f"cold item {cold!r}" in got["route"]["reason"]
    models = [loaded["mf"], loaded["tallrec"]]
    strict = Router(models, "auto", warm_user_min=10 ** 6)
    from recalign.serve.models import Context

    user = mf.catalog.user_index[warm_user]
    ctx = Context(user, *mf.catalog.user_log(user), mf.catalog.user_log(user)[0])
    assert strict.decide(ctx).model.name == "tallrec" and "< 1000000" in strict.decide(ctx).reason
    assert Router(models, "cf").decide(ctx).model.name == "mf"
    assert Router(models, "llm").decide(ctx).model.name == "tallrec"
    other = load_runs([loaded["mf"].path], LoadOptions())[0]
    Router([other, loaded["tallrec"]], "auto")  # loaded apart, the same dataset and data settings
    other.catalog = copy.copy(other.catalog)
    other.catalog.key = ("another dataset",)
    with pytest.raises(InputError, match="different data \\(datasets 'another dataset' vs "):
        Router([other, loaded["tallrec"]], "auto")
    data = json.loads(loaded["tallrec"].catalog.key[1])
    other.catalog.key = (loaded["tallrec"].catalog.key[0], json.dumps({**data, "like_threshold": 2}, sort_keys=True))
    with pytest.raises(InputError, match=f"data.like_threshold: 2 vs {data['like_threshold']!r}\\)"):
        Router([other, loaded["tallrec"]], "auto")
    described = client.get("/models").json()
    assert described["route"]["cf"] == "mf" and described["route"]["llm"] == "tallrec"
    assert {m["name"] for m in described["models"]} == set(loaded)
    assert described["models"][0]["metrics"]["method"] == "mf"


def test_runs_that_differ_only_in_the_prompt_noun_share_one_catalogue_and_keep_their_noun(runs, tmp_path):
    book = tmp_path / "tallrec-book"
    shutil.copytree(runs["tallrec"], book)
    config = (book / "config.yaml").read_text()
    assert "  domain: null\n" in config
    (book / "config.yaml").write_text(config.replace("  domain: null\n", "  domain: book\n", 1))
    mf, movie, booked = load_runs([runs["mf"], runs["tallrec"], book], LoadOptions())
    assert mf.catalog is movie.catalog is booked.catalog
    assert Router([mf, booked], "auto").routing
    rows = [(0, [1, 2], [True, False], 3)]
    assert "book" in booked.render(rows)[0][0] and "book" not in movie.render(rows)[0][0]


def test_route_study_reports_the_routed_system_beside_each_model(runs, loaded):
    models = load_runs([runs["mf"], runs["tallrec"]], LoadOptions())
    result = evaluate_routing(models[0], models[1], latency_requests=2)
    tallrec_auc = json.loads((runs["tallrec"] / "metrics.json").read_text())["test"]["auc"]
    assert result["test"]["tallrec"]["auc"] == pytest.approx(tallrec_auc, abs=1e-9)
    assert 0.0 <= result["llm_share"] <= 1.0 and set(result["test"]) == {"mf", "tallrec", "routed"}
    assert result["latency_ms"]["mf"] > 0 and result["latency_ms"]["tallrec"] > 0
    text = routing_markdown(result)
    assert "| routed |" in text and "--warm-user-min" in text


# -------------------------------------------------------------------------------------------- bad input
BAD = [
    ("/score", {"user": "no-such-user", "items": ["1"]}, 404, "user"),
    ("/score", {"user": "1", "items": ["1", "no-such-item"]}, 404, "items[1]"),
    ("/score", {"history": ["1", "nope"], "items": ["1"]}, 404, "history[1]"),
    ("/score", {"user": "1", "items": []}, 422, "items"),
    ("/score", {"history": [], "items": ["1"]}, 422, "history"),
    ("/score", {"items": ["1"]}, 422, "user"),
    ("/score", {"user": "1"}, 422, "items"),
    ("/score", {"user": "1", "items": "1"}, 422, "items"),
    ("/score", {"user": [1], "items": ["1"]}, 422, "user"),
    ("/score", {"user": True, "items": ["1"]}, 422, "user"),
    ("/score", {"user": "", "items": ["1"]}, 422, "user"),
    ("/score", {"user": "1", "items": ["1"], "colour": "red"}, 422, "colour"),
    ("/score", {"user": "1", "items": [str(i) for i in range(1, 66)]}, 422, "items"),
    ("/score", {"history": ["1", "2"], "liked": [True], "items": ["1"]}, 422, "liked"),
    ("/score", {"user": "1", "liked": [True], "items": ["1"]}, 422, "liked"),
    ("/score", {"user": "1", "items": ["1"], "model": "nope"}, 404, "model"),
    ("/recommend", {"user": "1", "k": 0}, 422, "k"),
    ("/recommend", {"user": "1", "k": -3}, 422, "k"),
    ("/recommend", {"user": "1", "k": 10 ** 9}, 422, "k"),
    ("/recommend", {"user": "1", "k": "ten"}, 422, "k"),
    ("/recommend", {"user": "1", "k": "3"}, 422, "k"),  # k is a strict integer: no coercion
    ("/recommend", {"user": "1", "k": True}, 422, "k"),
    ("/recommend", {"user": "1", "k": 1000.0}, 422, "k"),
    ("/recommend", {"history": ["1", "2"], "k": 3, "model": "mf"}, 422, "history"),  # MF scores known users only
    ("/score", {"history": ["1"], "items": ["50"], "model": "mf"}, 422, "history"),
    ("/recommend", {"user": "1", "k": 5, "exclude_seen": "maybe"}, 422, "exclude_seen"),
    ("/recommend", {"user": "1", "candidates": []}, 422, "candidates"),
    ("/recommend", {"user": "1", "candidates": ["x"]}, 404, "candidates[0]"),
    ("/recommend", [1, 2], 422, "body"),
    ("/recommend", None, 422, "body"),
]


@pytest.mark.parametrize("path,body,status,field", BAD)
def test_bad_requests_get_a_4xx_naming_the_field(client, path, body, status, field):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["field"] == field and payload["error"].startswith(f"{field}: ")
    assert "\n" not in payload["error"]


def test_an_over_long_list_is_worded_like_the_servers_own_limits(client):
    response = client.post("/recommend", json={"history": ["1"] * 20_000, "k": 3})
    assert response.status_code == 422
    assert response.json()["error"] == "history: at most 10000 items, got 20000"


def test_k_must_be_an_integer_not_a_string_bool_or_float(client):
    for k in (b'"3"', b"true", b"1e3", b"3.0"):
        r = client.post("/recommend", content=b'{"user": "1", "k": ' + k + b"}",
                        headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json() == {"error": "k: Input should be a valid integer", "field": "k"}, k
    assert len(client.post("/recommend", json={"user": "1", "k": 3}).json()["items"]) == 3


def test_a_model_that_scores_known_users_only_refuses_a_bare_history(client, loaded):
    from recalign.cf import MODELS, create_model
    from recalign.serve.models import scores_known_users_only

    assert {n for n in MODELS if scores_known_users_only(create_model(n, 4, 6))} == {"mf", "lightgcn"}
    assert loaded["mf"].needs_user and not loaded["sasrec"].needs_user and not loaded["tallrec"].needs_user
    described = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert described["mf"]["needs_user"] is True and described["sasrec"]["needs_user"] is False
    bare = {"/recommend": {"history": ["50", "181"], "k": 3}, "/score": {"history": ["50"], "items": ["1"]}}
    for path, body in bare.items():
        r = client.post(path, json={**body, "model": "mf"})
        assert r.status_code == 422 and r.json() == {
            "error": 'history: mf (mf) scores known users only; give "user", or use a sequential or LLM model',
            "field": "history"}
        assert client.post(path, json={**body, "model": "sasrec"}).status_code == 200
        assert client.post(path, json=body).json()["model"] == "tallrec"  # the router sends it to the LLM
    models = [loaded["mf"], loaded["tallrec"]]
    pinned = create_app(models, Router(models, "cf"))
    with TestClient(pinned) as c:
        r = c.post("/recommend", json={"history": ["50"], "k": 3})
        assert r.status_code == 422 and r.json()["field"] == "history"
        # user and history together: the history replaces the user's log, MF scores the user (documented)
        both = c.post("/score", json={"user": "1", "history": ["181"], "items": ["50"]}).json()
        alone = c.post("/score", json={"user": "1", "items": ["50"]}).json()
        assert both["model"] == "mf" and both["scores"] == alone["scores"]


def test_malformed_json_oversized_bodies_and_unknown_paths(client, loaded):
    headers = {"content-type": "application/json"}
    r = client.post("/score", content=b'{"user": "1", "items": [', headers=headers)
    assert r.status_code == 422 and r.json()["error"].startswith("body: malformed JSON")
    # every malformation gets the same status and one-line form (json.loads raises other than JSONDecodeError)
    for body, why in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
                      (b'{"user": "1\xff", "items": ["1"]}', "not UTF-8"),
                      (b'{"user": 1' + b"0" * 5000 + b', "items": ["1"]}', "an integer with too many digits")):
        r = client.post("/score", content=body, headers=headers)
        assert r.status_code == 422 and r.json() == {"error": f"body: malformed JSON ({why})", "field": "body"}
    r = client.post("/score", content=b" " * 1_000_001, headers=headers)
    assert r.status_code == 413 and r.json()["field"] == "body"
    r = client.post("/recommend", content=b"k=3", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and "Content-Type: application/json (got 'application/x-www-form-urlencoded')" in \
        r.json()["error"]
    r = client.post("/recommend", content=b'{"user": "1"}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["field"] == "body" and "(got 'text/plain')" in r.json()["error"]
    r = client.post("/recommend", content=b'{"user": "1"}', headers={"content-type": ""})
    assert r.status_code == 422 and "(got none)" in r.json()["error"]
    assert client.get("/nowhere").status_code == 404
    r = client.get("/score")
    assert r.status_code == 405 and r.json()["error"] == "GET /score: method not allowed; use POST"
    assert client.head("/health").status_code == 200  # load balancers' probes
    k = loaded["mf"].catalog.n_items + 1
    if k <= 1000:
        r = client.post("/recommend", json={"user": "1", "k": k})
        assert r.status_code == 422 and r.json()["field"] == "k"


_ids = st.one_of(st.text(max_size=6), st.integers(-5, 2000), st.booleans(), st.none(),
                 st.floats(allow_nan=False, allow_infinity=False))
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(),
                               st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=12)
_body = st.fixed_dictionaries({}, optional={
    "user": _ids, "history": st.lists(_ids, max_size=5) | _json, "liked": st.lists(st.booleans(), max_size=5) | _json,
    "items": st.lists(_ids, max_size=5) | _json, "k": st.integers(-3, 3000) | _json, "exclude_seen": _json,
    "candidates": st.lists(_ids, max_size=4) | _json, "model": st.sampled_from(["mf", "sasrec", "nope"]) | _json,
}) | _json


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/score", "/recommend"]), body=_body)
def test_fuzzed_requests_never_get_a_server_error(client, path, body):
    if isinstance(body, dict) and body.get("model") not in ("mf", "sasrec"):
        body = {**body, "model": "mf"}  # keep the LLM out of the loop: this checks validation, bounded in time
    response = client.post(path, json=body)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert "\n" not in response.json()["error"]


def test_the_openapi_schema_is_served(client):
    schema = client.get("/openapi.json").json()
    assert {"/recommend", "/score", "/health", "/models", "/metrics"} <= set(schema["paths"])


# -------------------------------------------------------------------------------------- run directories
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_runs_that_cannot_be_served_are_refused_with_one_line(runs, tmp_path):
    unfinished = _copy(runs["mf"], tmp_path / "unfinished")
    (unfinished / "metrics.json").unlink()
    corrupt = _copy(runs["mf"], tmp_path / "corrupt")
    (corrupt / "checkpoints" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    pickled = _copy(runs["mf"], tmp_path / "pickled")
    (pickled / "checkpoints" / "model.safetensors").unlink()
    (pickled / "checkpoints" / "model.pt").write_bytes(b"PK\x03\x04pickle-in-a-zip")
    other = _copy(runs["mf"], tmp_path / "other-method")
    metrics = json.loads((other / "metrics.json").read_text())
    (other / "metrics.json").write_text(json.dumps({**metrics, "method": "softprompt"}))
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("# run: mf on", "# run: softprompt on"))
    changed = _copy(runs["mf"], tmp_path / "changed-data")
    (changed / "metrics.json").write_text(json.dumps({**metrics, "dataset_fingerprint": "0" * 64}))
    binary = _copy(runs["tallrec"], tmp_path / "bin-adapter")
    adapter = binary / "checkpoints" / "adapter-seed0"
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    broken = _copy(runs["tallrec"], tmp_path / "broken-adapter")
    (broken / "checkpoints" / "adapter-seed0" / "adapter_model.safetensors").write_bytes(b"\xff" * 50)
    cases = {unfinished: "unfinished run", corrupt: "not a readable recalign state", pickled: "pickle",
             other: "cannot be served", changed: "changed since the run was trained", binary: "adapter_model.bin",
             broken: "adapter_model.safetensors is not a readable safetensors file",
             tmp_path / "missing": "not a directory", runs["root"]: "no config.yaml", runs["mf"]: "named twice"}
    for path, why in cases.items():
        with pytest.raises(InputError) as caught:
            load_runs([runs["mf"], path], LoadOptions())
        message = str(caught.value)
        assert str(path) in message and why in message and "\n" not in message, message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, **kwargs):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "RECALIGN_QUIET": "1"}
    return subprocess.Popen([str(Path(sys.executable).parent / "recalign"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_real_server_answers_and_stops_cleanly_and_bad_runs_exit_2(runs, tmp_path):
    import httpx

    broken = _copy(runs["mf"], tmp_path / "broken")
    (broken / "metrics.json").unlink()
    proc = _cli("serve", str(runs["mf"]), str(broken), "--port", str(_free_port()))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and str(broken) in err, err
    # a bad --dtype is refused even when only CF runs are served
    proc = _cli("serve", str(runs["mf"]), "--dtype", "float8", "--port", str(_free_port()))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--dtype: unknown dtype 'float8'" in err and err.strip().count("\n") == 0, err

    port = _free_port()
    proc = _cli("serve", str(runs["mf"]), "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.3)
        busy = _cli("serve", str(runs["mf"]), "--port", str(port))  # the port is taken: one line, exit 2
        _, busy_err = busy.communicate(timeout=120)
        assert busy.returncode == 2 and f"--port {port}" in busy_err
        got = httpx.post(f"{base}/recommend", json={"user": "1", "k": 3}, timeout=30).json()
        assert got["model"] == "mf" and len(got["items"]) == 3
        assert httpx.post(f"{base}/score", json={"user": "1", "items": ["nope"]}, timeout=30).status_code == 404
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'recalign_requests_total{endpoint="/recommend",model="mf",status="200"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "serving mf (mf) on http://127.0.0.1" in out


def test_calibration_never_reverses_a_models_order():
    from recalign.serve.router import _platt

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200).astype(bool)
    anti = -labels.astype(float) + rng.normal(0, 0.5, 200)  # ranks liked samples lower
    calibrate, slope = _platt(anti, labels)
    test = np.sort(rng.normal(0, 1, 50))
    assert slope < 0 and np.all(np.diff(calibrate(test)) > 0)  # increasing: the model's own order kept
    assert calibrate(test) == pytest.approx(np.full(50, labels.mean()), abs=1e-5)  # ~ the valid like-rate
    calibrate, slope = _platt(-anti, labels)
    assert slope > 0 and np.all(np.diff(calibrate(test)) > 0) and calibrate(test).std() > 0.1


def test_route_refuses_a_pair_in_the_wrong_order_before_loading_a_model(runs, monkeypatch):
    from recalign.serve import check_route_pair
    from recalign.serve import loading

    monkeypatch.setattr(loading, "load_run", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(InputError, match=r"^route: needs a CF run then a Yes/No LLM run .*; got tallrec and mf$"):
        check_route_pair(runs["tallrec"], runs["mf"])
    with pytest.raises(InputError, match="got mf and bigrec"):
        check_route_pair(runs["mf"], runs["bigrec"])
    check_route_pair(runs["mf"], runs["tallrec"])
