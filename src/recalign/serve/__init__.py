"""HTTP service over finished runs: `recalign serve RUN_DIR [RUN_DIR ...]`.

- `loading`: run directories -> served models (safetensors / JSON / YAML only, checked; one-line errors)
- `models`: the served kinds (CF, Yes/No LLM scorers, generators) and the dataset's id maps (`Catalog`)
- `batching`: micro-batching of concurrent requests into one forward pass
- `router`: the warm/cold router and its offline study (`recalign route`)
- `metrics`: Prometheus counters and histograms
- `app`: the FastAPI app

    models = load_runs(["runs/mf-ctr", "runs/tallrec"], LoadOptions(max_batch=32))
    app = create_app(models, Router(models, "auto", warm_user_min=5))
"""

from __future__ import annotations

from recalign.serve.loading import LoadOptions, load_runs, read_run, supported
from recalign.serve.router import Router, check_route_pair, evaluate_routing, routing_markdown


def create_app(*args, **kwargs):
    from recalign.serve.app import create_app as create

    return create(*args, **kwargs)


def listen(host: str, port: int):
    """A bound listening socket, or an InputError naming --host/--port (before any model is loaded)."""
    import socket

    from recalign.errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"--host {host}: cannot resolve it ({exc})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def run_server(app, sock, graceful_seconds: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests are answered before the models are closed, then it
    returns (exit code 0: a stop by signal is the normal end of a server)."""
    import signal

    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=graceful_seconds, access_log=False)
    # uvicorn re-raises the signal that stopped it once it has shut down; these handlers take it (instead of a
    # KeyboardInterrupt or a kill by the default SIGTERM action)
    stops: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stops.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stops:
        print(f"stopped by {signal.Signals(stops[0]).name}; in-flight requests were answered", flush=True)


__all__ = ["LoadOptions", "Router", "check_route_pair", "create_app", "evaluate_routing", "listen", "load_runs", "read_run",
           "routing_markdown", "run_server", "supported"]
