"""The warm/cold router: a CF model answers warm requests, an LLM the cold ones.

The seed's finding (CoLLM, TALLRec): CF models are hard to beat on users and items with many training
interactions, LLMs help where there are few. With one CF run and one LLM run loaded, `route: auto` sends a
request to the CF model when the user has at least `warm_user_min` training interactions in the CF run's
training data and (for /score) every item has at least `warm_item_min`; otherwise to the LLM. A request
without a user id is a cold user. `route: cf` / `route: llm` send everything to one side; a request that
names a model (`"model": NAME`) gets that model. Every response says which model answered and why.

`recalign route RUN_CF RUN_LLM` (`evaluate_routing`) picks the two thresholds on the validation samples of
the LLM run's own protocol (where the LLM's AUC stops beating CF's) and reports the routed system beside
each model alone, the share of requests the LLM answers, and what that costs in measured latency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recalign.errors import InputError
from recalign.serve.models import Context, ServedModel

MODES = ("auto", "cf", "llm")


@dataclass
class Decision:
    model: ServedModel
    reason: str


class Router:
    def __init__(self, models: list[ServedModel], mode: str = "auto", warm_user_min: int = 1,
                 warm_item_min: int = 1):
        if mode not in MODES:
            raise InputError(f"--route: expected one of {', '.join(MODES)}, got {mode!r}")
        for key, value in (("--warm-user-min", warm_user_min), ("--warm-item-min", warm_item_min)):
            if value < 0:
                raise InputError(f"{key}: must be >= 0, got {value}")
        self.models = {m.name: m for m in models}
        self.default = models[0]
        self.cf = next((m for m in models if m.role == "cf"), None)
        self.llm = next((m for m in models if m.role == "llm"), None)
        self.mode, self.warm_user_min, self.warm_item_min = mode, int(warm_user_min), int(warm_item_min)
        if mode == "cf" and self.cf is None:
            raise InputError("--route cf: no CF run is loaded")
        if mode == "llm" and self.llm is None:
            raise InputError("--route llm: no LLM run is loaded")
        if self.routing and self.cf.catalog.key != self.llm.catalog.key:
            raise InputError(f"--route auto: {self.cf.name} and {self.llm.name} are runs on different data "
                             f"({self.cf.catalog.difference(self.llm.catalog)}); a router needs one catalogue "
                             "(or use --route cf / --route llm)")

    @property
    def routing(self) -> bool:
        """auto with both sides loaded: requests are routed by warmness."""
        return self.mode == "auto" and self.cf is not None and self.llm is not None

    def describe(self) -> dict:
        return {"mode": self.mode, "routing": self.routing, "cf": self.cf.name if self.cf else None,
                "llm": self.llm.name if self.llm else None, "warm_user_min": self.warm_user_min,
                "warm_item_min": self.warm_item_min, "default": self.entry().name}

    def entry(self) -> ServedModel:
        """The model whose catalogue resolves a request that names no model."""
        if self.mode == "llm":
            return self.llm
        if self.mode == "cf" or self.routing:
            return self.cf
        return self.default

    def decide(self, ctx: Context, items: np.ndarray | None = None) -> Decision:
        if not self.routing:
            model = self.entry()
            return Decision(model, f"route {self.mode}" if self.mode != "auto" else "the only model kind loaded")
        user_count = int(self.cf.train_user_counts[ctx.user]) if ctx.user >= 0 else None
        if user_count is None:
            return Decision(self.llm, "cold user: no user id, a history only")
        if user_count < self.warm_user_min:
            return Decision(self.llm, f"cold user: {user_count} training interactions < {self.warm_user_min}")
        if items is not None and len(items):
            counts = self.cf.train_item_counts[items]
            cold = int(np.argmin(counts))
            if counts[cold] < self.warm_item_min:
                raw = self.cf.catalog.item_raw[int(items[cold])]
                return Decision(self.llm, f"cold item {raw!r}: {int(counts[cold])} training interactions < "
                                          f"{self.warm_item_min}")
        return Decision(self.cf, f"warm: user has {user_count} training interactions >= {self.warm_user_min}"
                        + (f", every item >= {self.warm_item_min}" if items is not None else ""))


# ------------------------------------------------------------------------------------- offline study
GRID = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, np.inf)


def _platt(scores: np.ndarray, labels: np.ndarray):
    """(map, fitted slope): a logistic map of raw scores to probabilities fitted on (valid) labels, so that
    two models' scores can be compared in one ranking; the identity order when only one class is present.
    The map never reverses a model's order (the server serves its raw scores): where the fitted slope is not
    positive (valid scores no better than chance), every score maps to about the valid like-rate, still
    increasing (a slope of 1e-6 per standard deviation)."""
    from sklearn.linear_model import LogisticRegression

    scores = np.asarray(scores, np.float64).reshape(-1, 1)
    if len(set(labels.tolist())) < 2 or not np.isfinite(scores).all():
        return (lambda s: 1.0 / (1.0 + np.exp(-np.clip(np.asarray(s, np.float64), -50, 50)))), None
    fit = LogisticRegression(C=1e6).fit(scores, labels.astype(int))
    slope = float(fit.coef_[0, 0])
    if slope > 0:
        return (lambda s: fit.predict_proba(np.asarray(s, np.float64).reshape(-1, 1))[:, 1]), slope
    rate = float(labels.mean())
    base, center, spread = np.log(rate / (1 - rate)), float(scores.mean()), float(scores.std()) or 1.0
    return (lambda s: 1.0 / (1.0 + np.exp(-(base + 1e-6 * (np.asarray(s, np.float64) - center) / spread)))), slope


def _route_mask(users, items, user_counts, item_counts, tu, ti) -> np.ndarray:
    """True where the LLM answers (cold by the thresholds)."""
    return (user_counts[users] < tu) | (item_counts[items] < ti)


def check_route_pair(run_cf, run_llm) -> None:
    """`recalign route`'s two runs, read but not loaded: a CF run, then a Yes/No LLM run."""
    from recalign.cf import MODELS
    from recalign.serve.loading import YES_NO, read_run

    cf, llm = read_run(run_cf), read_run(run_llm)
    if cf.method not in MODELS or llm.method not in YES_NO:
        raise InputError(f"route: needs a CF run then a Yes/No LLM run ({', '.join(YES_NO)}); got {cf.method} "
                         f"and {llm.method}")


def evaluate_routing(cf: ServedModel, llm: ServedModel, latency_requests: int = 8) -> dict:
    """Scores of the LLM run's own valid and test samples by both models; thresholds chosen on valid;
    AUC/UAUC on all / warm / cold test samples for CF, LLM and the routed system; latency and cost."""
    import asyncio
    import time

    from recalign.cf import EvalSet, score_pairs
    from recalign.tasks.ctr import collm_protocol, ctr_report, tallrec_protocol

    if cf.role != "cf" or llm.kind != "yesno":
        raise InputError(f"route: needs a CF run then a Yes/No LLM run (tallrec, icl, collm); got {cf.method} "
                         f"and {llm.method}")
    if cf.catalog.key != llm.catalog.key:
        raise InputError(f"route: {cf.name} and {llm.name} are runs on different data "
                         f"({cf.catalog.difference(llm.catalog)})")
    ds = llm.catalog.ds
    cfg = llm.config
    if llm.method == "collm":
        data = collm_protocol(ds, cfg["data_protocol"], int(cfg.get("seed", 0)))
    else:
        data = tallrec_protocol(ds, cfg["samples"])
    warnings = []
    if cf.config.get("protocol", "loo") == "loo":
        warnings.append(f"{cf.name} was trained leave-one-out: its training data include the LLM protocol's "
                        "valid/test period, so its warm scores are optimistic; train it with --set protocol=ctr")

    async def llm_scores(frame) -> np.ndarray:
        rows = [(int(u), tuple(int(i) for i in h), tuple(bool(x) for x in hl) if hl is not None else
                 (True,) * len(h), int(t))
                for u, h, hl, t in zip(frame["user"], frame["history"],
                                       frame["history_labels"] if "history_labels" in frame else [None] * len(frame),
                                       frame["item"])]
        if llm.liked_only:  # CoLLM frames already hold the liked history
            rows = [(u, h, (True,) * len(h), t) for u, h, _, t in rows]
        return np.asarray(await llm.batcher.submit(rows), np.float64)

    async def study():
        out = {}
        for name, frame in (("valid", data.valid), ("test", data.test)):
            out[name] = (np.asarray(score_pairs(cf.model, EvalSet.from_samples(frame)), np.float64),
                         await llm_scores(frame))
        # latency: one request of one item, alone, per model (after one warm-up)
        row = data.test.iloc[0]
        ctx = Context(int(row["user"]), np.asarray(row["history"], np.int64),
                      np.asarray(row.get("history_labels", (True,) * len(row["history"])), bool),
                      np.asarray(row["history"], np.int64))
        item = np.asarray([int(row["item"])])
        timing = {}
        for model in (cf, llm):
            await model.score(ctx, item)
            started = time.perf_counter()
            for _ in range(latency_requests):
                await model.score(ctx, item)
            timing[model.name] = 1000 * (time.perf_counter() - started) / latency_requests
        await llm.batcher.close()
        return out, timing

    scores, ms = asyncio.run(study())
    users_c, items_c = cf.train_user_counts, cf.train_item_counts
    labels = {n: f["label"].to_numpy(bool) for n, f in (("valid", data.valid), ("test", data.test))}
    (cal_cf, slope_cf), (cal_llm, slope_llm) = (_platt(scores["valid"][i], labels["valid"]) for i in (0, 1))
    for model, slope in ((cf, slope_cf), (llm, slope_llm)):
        if slope is not None and slope <= 0:
            warnings.append(f"{model.name}'s valid scores rank liked samples no higher than disliked ones (Platt "
                            f"slope {slope:.3g}): the routed system gives its answers the valid like-rate")

    def routed(name, tu, ti):
        frame = data.valid if name == "valid" else data.test
        to_llm = _route_mask(frame["user"].to_numpy(np.int64), frame["item"].to_numpy(np.int64), users_c, items_c,
                             tu, ti)
        s_cf, s_llm = scores[name]
        return np.where(to_llm, cal_llm(s_llm), cal_cf(s_cf)), to_llm

    from recalign.eval.metrics import auc as auc_of

    best = None
    for tu in GRID:
        for ti in GRID:
            s, to_llm = routed("valid", tu, ti)
            value = auc_of(labels["valid"], s)
            value = -1.0 if value != value else value  # one class only: every threshold ties
            key = (round(value, 6), -to_llm.mean())  # the better AUC; on a tie, fewer LLM calls
            if best is None or key > best[0]:
                best = (key, tu, ti)
    _, tu, ti = best
    s_routed, to_llm = routed("test", tu, ti)
    table = {cf.name: ctr_report(data.test, scores["test"][0]), llm.name: ctr_report(data.test, scores["test"][1]),
             "routed": ctr_report(data.test, s_routed)}
    share = float(to_llm.mean()) if len(to_llm) else 0.0
    routed_ms = share * ms[llm.name] + (1 - share) * ms[cf.name]
    extra_ms = routed_ms - ms[cf.name]
    gain = table["routed"]["auc"] - table[cf.name]["auc"]
    llm_gain = table[llm.name]["auc"] - table[cf.name]["auc"]
    return {
        "cf": cf.name, "llm": llm.name, "protocol": llm.method, "samples": {"valid": len(data.valid),
                                                                            "test": len(data.test)},
        "thresholds": {"warm_user_min": _finite(tu), "warm_item_min": _finite(ti)},
        "llm_share": share, "test": table, "latency_ms": {**ms, "routed": routed_ms},
        "cost": {
            "extra_ms_per_request": {"routed": extra_ms, llm.name: ms[llm.name] - ms[cf.name]},
            "extra_cpu_seconds_per_1000_requests": {"routed": extra_ms, llm.name: ms[llm.name] - ms[cf.name]},
            "auc_gain_over_cf": {"routed": gain, llm.name: llm_gain},
            "auc_gain_per_extra_ms": {"routed": _ratio(gain, extra_ms),
                                      llm.name: _ratio(llm_gain, ms[llm.name] - ms[cf.name])},
        },
        "warnings": warnings,
    }


def _finite(value):
    return None if value == np.inf else int(value)


def _ratio(a, b):
    return None if a is None or b is None or a != a or abs(b) < 1e-9 else a / b


def routing_markdown(result: dict) -> str:
    cf, llm = result["cf"], result["llm"]
    thresholds = result["thresholds"]

    def fmt(value, digits=4):
        return "-" if value is None or value != value else f"{value:.{digits}f}"

    lines = [f"Routing {cf} (CF) / {llm} (LLM) on the {result['protocol']} protocol's samples "
             f"({result['samples']['valid']} valid choose the thresholds, {result['samples']['test']} test)", "",
             f"Thresholds: warm user >= {thresholds['warm_user_min'] if thresholds['warm_user_min'] is not None else 'inf'} "
             f"training interactions, warm item >= "
             f"{thresholds['warm_item_min'] if thresholds['warm_item_min'] is not None else 'inf'}; "
             f"the LLM answers {100 * result['llm_share']:.1f}% of test requests", "",
             "| system | AUC | UAUC | AUC warm | AUC cold | ms / request |", "|---|---|---|---|---|---|"]
    for name, metrics in result["test"].items():
        lines.append(f"| {name} | {fmt(metrics.get('auc'))} | {fmt(metrics.get('uauc'))} | "
                     f"{fmt(metrics.get('auc_warm'))} | {fmt(metrics.get('auc_cold'))} | "
                     f"{fmt(result['latency_ms'].get(name), 1)} |")
    cost = result["cost"]
    lines += ["", "| vs CF alone | AUC gain | extra ms / request | extra CPU s / 1,000 requests | AUC gain per extra ms |",
              "|---|---|---|---|---|"]
    for name in ("routed", llm):
        lines.append(f"| {name} | {fmt(cost['auc_gain_over_cf'][name])} | {fmt(cost['extra_ms_per_request'][name], 1)} | "
                     f"{fmt(cost['extra_cpu_seconds_per_1000_requests'][name], 1)} | "
                     f"{fmt(cost['auc_gain_per_extra_ms'][name], 6)} |")
    lines += [f"", f"Serve with: --route auto --warm-user-min {thresholds['warm_user_min'] if thresholds['warm_user_min'] is not None else 10**9} "
              f"--warm-item-min {thresholds['warm_item_min'] if thresholds['warm_item_min'] is not None else 10**9}"]
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines) + "\n"
