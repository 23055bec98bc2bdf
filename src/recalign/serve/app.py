"""The HTTP app (FastAPI): /recommend, /score, /health, /models, /metrics over loaded runs.

Ids in requests and responses are the dataset's raw ids (strings; integers are accepted and read as their
decimal string). A request names a user (`user`), or gives a history (`history`: item ids oldest first,
optional `liked` flags aligned with it; default all liked), or both (the history then replaces the user's
logged one; the user id still picks the route, and MF / LightGCN score the user). A model that scores known
users only (`needs_user`: MF, LightGCN) refuses a history without a user. Every bad request is a 4xx whose
body is `{"error": "FIELD: what is wrong", "field": FIELD}`: malformed JSON, a missing or mistyped field, an
unknown field, an unknown user / item / model (404), an empty history, k out of range, too many items, a body
over the size limit (413). Every answer says which model answered and why (`model`, `route`).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException

from recalign.errors import InputError
from recalign.serve.metrics import Metrics
from recalign.serve.models import Catalog, Context, ServedModel
from recalign.serve.router import Decision, Router

log = logging.getLogger("recalign.serve")

MAX_LIST = 10_000  # schema bound of every id list; the server's own limits (Settings) are tighter
MAX_K = 1000


@dataclass
class Settings:
    max_items: int = 256  # items (or candidates) per request
    max_body_bytes: int = 1_000_000
    max_history: int = 1000


# ------------------------------------------------------------------------------------------- schemas
def _raw_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("an id is a string or an integer")
    if isinstance(value, int) and abs(value) >= 10 ** 64:
        raise ValueError("an integer id has at most 64 digits")
    text = str(value)
    if not text.strip():
        raise ValueError("an id must not be empty")
    if len(text) > 256:
        raise ValueError("an id has at most 256 characters")
    return text


RawId = Annotated[str, BeforeValidator(_raw_id),
                  WithJsonSchema({"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256}, {"type": "integer"}]})]


class Who(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: Optional[RawId] = Field(None, description="a user id of the dataset (raw id)")
    history: Optional[list[RawId]] = Field(None, max_length=MAX_LIST,
                                           description="item ids, oldest first (replaces the user's logged history)")
    liked: Optional[list[StrictBool]] = Field(None, max_length=MAX_LIST,
                                              description="per history item: liked (default: all true)")
    model: Optional[str] = Field(None, max_length=256, description="a loaded model's name; default: the router")


class RecommendRequest(Who):
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="how many items")
    exclude_seen: StrictBool = Field(True, description="leave out the user's logged items and the history")
    candidates: Optional[list[RawId]] = Field(None, max_length=MAX_LIST,
                                              description="rank only these items (default: the whole catalogue; "
                                                          "an LLM scorer re-ranks the most popular unseen items)")


class ScoreRequest(Who):
    items: list[RawId] = Field(..., max_length=MAX_LIST, description="item ids to score")


class ItemScore(BaseModel):
    item: str
    title: str
    score: Optional[float]


class Route(BaseModel):
    mode: str
    reason: str


class RecommendResponse(BaseModel):
    model: str
    method: str
    route: Route
    candidates: str
    items: list[ItemScore]
    generated: Optional[str] = None


class ScoreResponse(BaseModel):
    model: str
    method: str
    route: Route
    scores: list[ItemScore]


class ErrorResponse(BaseModel):
    error: str
    field: Optional[str] = None


ERRORS = {code: {"model": ErrorResponse} for code in (404, 413, 422)}


# what json.loads raises besides JSONDecodeError (exact types: UnicodeDecodeError is a ValueError)
BODY_ERRORS = {UnicodeDecodeError: "not UTF-8", RecursionError: "nested too deeply",
               ValueError: "an integer with too many digits"}


class ApiError(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


# ------------------------------------------------------------------------------------ the request guard
class Guard:
    """Pure ASGI middleware: refuses bodies over the limit (413, before the app parses anything) and records
    every request in the metrics (endpoint, answering model, status, latency)."""

    def __init__(self, app, metrics: Metrics, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def send_tracking(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
                return await _too_large(send_tracking, self.max_body)
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    status[0] = 499
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await _too_large(send_tracking, self.max_body)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_tracking)
        finally:
            model = (scope.get("state") or {}).get("model", "-")
            self.metrics.request(scope.get("path", ""), model, status[0], time.perf_counter() - started)


async def _too_large(send, limit: int) -> None:
    body = JSONResponse({"error": f"body: larger than the limit of {limit} bytes", "field": "body"}, 413)
    await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
    await send({"type": "http.response.body", "body": body.body})


# --------------------------------------------------------------------------------------------- the app
def create_app(models: list[ServedModel], router: Router, settings: Settings | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = metrics or Metrics()
    by_name = {m.name: m for m in models}
    started_at = time.time()
    for model in models:
        batcher = getattr(model, "batcher", None)
        if batcher is not None:
            batcher.on_batch = (lambda rows, requests, seconds, name=model.name:
                                metrics.batch(name, rows, requests, seconds))

    @asynccontextmanager
    async def lifespan(app):
        yield
        for model in models:  # in-flight requests have been answered (uvicorn drains connections first)
            await model.close()

    app = FastAPI(title="recalign serve", version="1", lifespan=lifespan,
                  description="Recommendations and scores from finished recalign runs, with a warm/cold router.")
    app.state.models, app.state.router, app.state.metrics, app.state.settings = models, router, metrics, settings
    app.add_middleware(Guard, metrics=metrics, max_body=settings.max_body_bytes)

    # ----- errors: always one line naming the field
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": f"{exc.field}: {exc.message}", "field": exc.field}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        field, message = _first_error(exc.errors())
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if field == "body" and not kind.endswith("json"):  # FastAPI reads only bodies sent as JSON as objects
            message = f"send a JSON object with Content-Type: application/json (got {repr(kind) if kind else 'none'})"
        return JSONResponse({"error": f"{field}: {message}", "field": field}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI: json.loads failed with other than a JSONDecodeError
            why = BODY_ERRORS.get(type(exc.__cause__), "unreadable")
            return JSONResponse({"error": f"body: malformed JSON ({why})", "field": "body"}, 422)
        detail = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 405:
            allowed = (getattr(exc, "headers", None) or {}).get("Allow", "")
            detail = f"{request.method} {request.url.path}: method not allowed" + (f"; use {allowed}" if allowed else "")
        return JSONResponse({"error": detail, "field": None}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return JSONResponse({"error": f"request: {' '.join(str(exc).split())}", "field": None}, 422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"},
                            500)

    # ----- endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [m.name for m in models], "uptime_s": round(time.time() - started_at, 3)}

    app.head("/health", include_in_schema=False)(health)  # load balancers' probes

    @app.get("/models")
    async def list_models():
        return {"models": [m.describe() for m in models], "route": router.describe()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type=metrics.content_type)

    def named(name: str | None) -> ServedModel | None:
        if name is None:
            return None
        if name not in by_name:
            raise ApiError(404, "model", f"unknown model {name!r}; loaded: {', '.join(by_name)}")
        return by_name[name]

    def answer(request: Request, decision: Decision) -> dict:
        request.state.model = decision.model.name
        metrics.routes.labels(decision.model.name).inc()
        return {"model": decision.model.name, "method": decision.model.method,
                "route": {"mode": router.mode if not request.state.named else "model", "reason": decision.reason}}

    def listing(catalog: Catalog, items, scores) -> list[dict]:
        return [{"item": catalog.item_raw[int(i)], "title": catalog.titles[int(i)],
                 "score": float(s) if np.isfinite(s) else None} for i, s in zip(items, scores)]

    @app.post("/score", response_model=ScoreResponse, responses=ERRORS)
    async def score(body: ScoreRequest, request: Request):
        chosen = named(body.model)
        request.state.named = chosen is not None
        catalog = (chosen or router.entry()).catalog
        ctx = _context(body, catalog, settings)
        if not body.items:
            raise ApiError(422, "items", "empty; give at least one item id")
        if len(body.items) > settings.max_items:
            raise ApiError(422, "items", f"at most {settings.max_items} items per request, got {len(body.items)}")
        items = _items(body.items, catalog, "items")
        decision = Decision(chosen, "requested by name") if chosen else router.decide(ctx, items)
        _check_user(decision.model, ctx)
        scores = await _guarded(decision.model.score(ctx, items))
        return {**answer(request, decision), "scores": listing(catalog, items, scores)}

    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(body: RecommendRequest, request: Request):
        chosen = named(body.model)
        request.state.named = chosen is not None
        catalog = (chosen or router.entry()).catalog
        ctx = _context(body, catalog, settings)
        if body.k > catalog.n_items:
            raise ApiError(422, "k", f"must be at most the catalogue size {catalog.n_items}, got {body.k}")
        candidates = None
        if body.candidates is not None:
            if not body.candidates:
                raise ApiError(422, "candidates", "empty; leave it out to rank the whole catalogue")
            if len(body.candidates) > settings.max_items:
                raise ApiError(422, "candidates", f"at most {settings.max_items} candidates per request, "
                                                  f"got {len(body.candidates)}")
            candidates = np.unique(_items(body.candidates, catalog, "candidates"))
        decision = Decision(chosen, "requested by name") if chosen else router.decide(ctx)
        _check_user(decision.model, ctx)
        ranked = await _guarded(decision.model.recommend(ctx, body.k, body.exclude_seen, candidates))
        return {**answer(request, decision), "candidates": ranked.candidates,
                "items": listing(catalog, ranked.items, ranked.scores), "generated": ranked.generated}

    return app


async def _guarded(awaitable):
    try:
        return await awaitable
    except RuntimeError as exc:
        if "shutting down" in str(exc) or "after shutdown" in str(exc):
            raise ApiError(503, "server", "shutting down") from None
        raise


def _first_error(errors) -> tuple[str, str]:
    if not errors:
        return "body", "invalid request"
    error = errors[0]
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        return "body", f"malformed JSON{f' ({reason})' if reason else ''}"
    loc = [p for p in error.get("loc", ()) if p != "body"]
    field = ""
    for part in loc:
        if not isinstance(part, int) and not str(part).isidentifier():
            part = repr(str(part))  # a client's odd key ("a\nb", "") stays one readable line
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    field = field or "body"
    message = str(error.get("msg", "invalid"))
    if kind == "missing" and field == "body":
        message = "a JSON object is required"
    elif kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "too_long" and error.get("ctx"):  # worded like the server's own limits
        message = f"at most {error['ctx'].get('max_length')} items, got {error['ctx'].get('actual_length')}"
    elif kind.startswith("value_error"):
        message = message.removeprefix("Value error, ")
    return field, " ".join(message.split())


def _context(body: Who, catalog: Catalog, settings: Settings) -> Context:
    user = -1
    if body.user is not None:
        user = catalog.user_index.get(body.user, -1)
        if user < 0:
            raise ApiError(404, "user", f"unknown user id {body.user!r} (not in dataset {catalog.name})")
    if body.history is None:
        if body.liked is not None:
            raise ApiError(422, "liked", "given without a history")
        if user < 0:
            raise ApiError(422, "user", "give a user id or a history (item ids)")
        history, liked = catalog.user_log(user)
        return Context(user, history, liked, history)
    if not body.history:
        raise ApiError(422, "history", "empty; give at least one item id (or leave it out and give a user id)")
    if len(body.history) > settings.max_history:
        raise ApiError(422, "history", f"at most {settings.max_history} items, got {len(body.history)}")
    history = _items(body.history, catalog, "history")
    if body.liked is not None and len(body.liked) != len(history):
        raise ApiError(422, "liked", f"has {len(body.liked)} entries, the history {len(history)}")
    liked = np.asarray(body.liked if body.liked is not None else [True] * len(history), bool)
    seen = history if user < 0 else np.union1d(history, catalog.user_log(user)[0])
    return Context(user, history, liked, seen)


def _check_user(model: ServedModel, ctx: Context) -> None:
    if ctx.user < 0 and model.needs_user:
        raise ApiError(422, "history", f'{model.name} ({model.method}) scores known users only; give "user", '
                                       "or use a sequential or LLM model")


def _items(ids: list[str], catalog: Catalog, field: str) -> np.ndarray:
    out = np.empty(len(ids), np.int64)
    for k, raw in enumerate(ids):
        index = catalog.item_index.get(raw)
        if index is None:
            raise ApiError(404, f"{field}[{k}]", f"unknown item id {raw!r} (not in dataset {catalog.name})")
        out[k] = index
    return out
