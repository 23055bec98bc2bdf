"""Run one method into a run directory, or every registered experiment (`reproduce`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from recalign import config as cfg
from recalign import distributed
from recalign.data import canonical_dataset
from recalign.errors import InputError
from recalign.methods import Experiment, RunContext, all_experiments, get_method
from recalign.io import is_temporary
from recalign.runs import RunDir, check_out


def resolve_config(method: str, config_file: str | None, sets: list[str] | None) -> dict:
    """defaults < --config file < --set, validated by the method (once, before anything is written)."""
    spec = get_method(method)
    defaults = cfg.merge_defaults(cfg.BASE_DEFAULTS, spec.defaults)
    config = cfg.resolve(defaults, config_file, sets, nullable=spec.nullable, moved=spec.moved)
    cfg.check_base(config)
    if spec.validate is not None:
        spec.validate(config)
    return config


def dataset_warnings(spec, config: dict, ds) -> list[str]:
    """One InputError for every need the dataset does not meet; the thin-data warnings otherwise."""
    from recalign.data import Needs, check_dataset

    return check_dataset(ds, spec.needs(config) if spec.needs else Needs())


def undefined_metrics(test: dict) -> list[str]:
    """A headline metric that came out undefined (e.g. AUC on a test part with one label) is said, not hidden."""
    out = []
    for key, value in test.items():
        if key.split("_")[0] in ("auc", "uauc") and not key.endswith(("_ci", "_std")) and (value is None or value != value):
            slice_size = test.get("n" + key[key.index("_"):]) if "_" in key else test.get("n")
            if slice_size == 0:
                part = key[key.index("_") + 1:] + " " if "_" in key else ""
                out.append(f"test {key} is undefined (no {part}test samples)")
            else:
                out.append(f"test {key} is undefined (one label only among the"
                           f"{'' if slice_size is None else f' {slice_size}'} samples it is computed on)")
    return out


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure (a config asking for more memory than the machine has), not a bug."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(s in text for s in ("can't allocate memory", "out of memory",
                                                                   "not enough memory"))


def run_method(method: str, dataset: str, out: str | Path, config_file: str | None = None,
               sets: list[str] | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Validate everything that can be validated before anything is written, then run.

    `--out` rules (`RunDir.prepare`): an unfinished run with the same config is continued, a finished one is
    kept with `resume`, `overwrite` deletes either and starts afresh."""
    spec = get_method(method)
    config = resolve_config(method, config_file, sets)
    recorded = canonical_dataset(dataset)  # a local path is recorded absolute: any cwd or spelling continues it
    distributed.current()  # a multi-process launch: the process group (and the launch config's checks) first
    run = RunDir(out, resume=resume, overwrite=overwrite)
    run.check()  # --out itself (under a file, /proc, unwritable...) before the dataset is read
    try:
        return _run_into(run, spec, method, dataset, config, recorded)
    finally:
        run.release()  # the run directory's lock (another process may continue it now)


def _run_into(run: RunDir, spec, method: str, dataset: str, config: dict, recorded: str) -> dict:
    context = RunContext(method=method, dataset_name=dataset, config=config, run=run)
    warnings = dataset_warnings(spec, config, context.dataset)  # load + check before anything is written
    from recalign.llm.precision import with_env_dtype

    config_text = cfg.dump(with_env_dtype(config))  # RECALIGN_DTYPE's choice recorded: a resume cannot mix dtypes
    run.prepare(config_text, origin=f"{method} on {recorded}")  # new, continued (same config), kept (finished
    # + resume) or replaced (overwrite); a run of another method or dataset is never continued
    if run.finished():
        metrics = run.read_metrics()
        missing = not (run.path / "report.md").is_file()
        distributed.current().barrier()  # every process has looked before the main process repairs it
        if missing:  # lost to a crash between the two writes: repaired
            from recalign.report.markdown import run_report

            run.write_text("report.md", run_report(metrics, config, spec))
            context.log("report.md was missing; written again from metrics.json")
        context.log(f"{run.path} already finished; metrics.json kept")
        return metrics
    run.record_dataset(recorded, context.dataset)  # continuing on changed data is refused
    context.log(f"run {method} on {dataset} -> {run.path}")
    started = time.perf_counter()
    try:
        try:
            result = spec.run(context)
        except (MemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            raise InputError(f"{method}: out of memory ({' '.join(str(exc).split())[:160]}); a size in the "
                             f"config (model, batch, history) is too large for this machine") from None
    except InputError:
        if run.new:  # bad input found mid-run of a new run: leave nothing half-written behind
            run.discard()
        raise
    metrics = {
        "method": method,
        "dataset": recorded,
        "dataset_fingerprint": context.dataset.fingerprint(),  # serving checks it against the data it reloads
        "test": result.get("test", {}),
        "valid": result.get("valid", {}),
        "seconds": {"train": 0.0, "eval": 0.0, **result.get("seconds", {}),
                    "total": time.perf_counter() - started},
    }
    metrics.update({k: v for k, v in {**context.recorded, **result}.items() if k not in metrics})
    metrics["warnings"] = warnings + list(result.get("warnings", [])) + undefined_metrics(metrics["test"])
    for warning in metrics["warnings"]:
        context.log(f"warning: {warning}")
    from recalign.report.markdown import run_report

    run.write_text("report.md", run_report(metrics, config, spec))
    run.write_metrics(metrics)  # last: metrics.json marks the run finished
    context.log(f"done in {metrics['seconds']['total']:.1f}s; metrics in {run.path / 'metrics.json'}")
    return metrics


def reproduce(out: str | Path, profile: str = "quick", only: list[str] | None = None,
              resume: bool = True, overwrite: bool = False) -> Path:
    """Run every registered experiment of `profile` into OUT/<experiment>/, then write the report.

    Finished experiments are kept (the command can be re-run to continue after an interruption)."""
    if profile not in ("quick", "full"):
        raise InputError(f"--profile must be 'quick' or 'full', got {profile!r}")
    out = check_reproduce_out(out)
    experiments: list[Experiment] = [e for e in all_experiments() if profile in e.profiles]
    if only:
        unknown = sorted(set(only) - {e.name for e in experiments})
        if unknown:
            raise InputError(f"unknown experiment(s) {', '.join(unknown)}; known: "
                             f"{', '.join(e.name for e in experiments)}")
        experiments = [e for e in experiments if e.name in only]
    from recalign.progress import console, quiet

    results = []
    for index, exp in enumerate(experiments, start=1):
        overrides = exp.quick if profile == "quick" else exp.full
        sets = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
        if not quiet():
            console.rule(f"[{index}/{len(experiments)}] {exp.name}: {exp.method} on {exp.dataset}")
        replace = overwrite and not _same_run(out / exp.name, exp, sets)
        metrics = run_method(exp.method, exp.dataset, out / exp.name, sets=sets, resume=resume and not replace,
                             overwrite=replace)
        results.append((exp, metrics))
    from recalign.report.summary import write_reproduce_report

    return write_reproduce_report(out, profile, results)


def check_reproduce_out(out: str | Path) -> Path:
    """--out of reproduce: writable (`check_out`, before Path(): an empty --out is not ".") and new, empty, or
    holding only what reproduce writes (its report.md and report.html, run directories, a folder per
    experiment); a folder of other files is never written into, so nothing of the user's is overwritten."""
    from recalign.report.summary import written_by_reproduce

    check_out(out)
    out = Path(out)
    if not out.is_dir():
        return out
    names = {e.name for e in all_experiments()}
    for entry in sorted(out.iterdir()):
        if is_temporary(entry.name) or written_by_reproduce(entry) or \
                entry.is_dir() and (entry.name in names or os.path.isfile(entry / "config.yaml")):
            continue
        raise InputError(f"--out {out}: holds {entry.name}, which reproduce did not write, so it is not a "
                         "reproduce directory (and is never written into); choose a new or empty directory")
    return out


def _yaml_value(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _same_run(path: Path, exp: Experiment, sets: list[str]) -> bool:
    """True when PATH holds a finished run of exactly this experiment's config (kept by --overwrite too)."""
    if not (path / "metrics.json").is_file() or not (path / "config.yaml").is_file():
        return False
    try:
        config = resolve_config(exp.method, None, sets)
    except InputError:
        return False
    saved = (path / "config.yaml").read_text()
    return saved.startswith(cfg.dump(config))
