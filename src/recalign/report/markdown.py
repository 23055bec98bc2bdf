"""report.md for one run."""

from __future__ import annotations

from recalign import config as cfg


def metrics_table(rows: list[tuple[str, dict]], columns: list[str] | None = None) -> str:
    """A Markdown table: one row per (label, {metric: value})."""
    if columns is None:
        columns = []
        for _, values in rows:
            columns.extend(k for k in values if k not in columns and isinstance(values[k], (int, float)))
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, values in rows:
        cells = [_fmt(values.get(c)) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:
            return "undefined"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def signed_span(ci) -> str:
    """A paired difference's interval as text: [-0.0123, +0.0045]."""
    return "[undefined]" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def paired_table(differences: list[dict], reference: str) -> str:
    """Runs minus a reference on the same test cases (`runs.paired_differences`): AUC and UAUC differences of
    Yes/No runs, or NDCG@10 of next-item runs, each with its paired interval."""
    if differences and "auc" in differences[0]:
        lines = [f"| run − {reference} (paired, same test samples) | n | AUC [95%] | UAUC [95%] |", "|---|---|---|---|"]
        lines += [f"| {d['run']} | {d['n']} | {d['auc']['difference']:+.4f} {signed_span(d['auc']['ci'])} | "
                  f"{d['uauc']['difference']:+.4f} {signed_span(d['uauc']['ci'])} |" for d in differences]
    else:
        lines = [f"| run − {reference} (paired, same test cases) | n | NDCG@10 [95%] |", "|---|---|---|"]
        lines += [f"| {d['run']} | {d['n']} | {d['ndcg@10']['ndcg@10']:+.4f} {signed_span(d['ndcg@10']['ci'])} |"
                  for d in differences]
    return "\n".join(lines)


def interval_lines(test: dict) -> list[str]:
    """The test metrics' 95% bootstrap intervals (`<metric>_ci`) and the sample count they rest on."""
    cells = [f"{key[:-3]} {test[key[:-3]]:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" for key, ci in test.items()
             if key.endswith("_ci") and ci and isinstance(test.get(key[:-3]), float)]
    if not cells:
        return []
    size = f" on {test['n']} test samples" if "n" in test else ""
    return [f"95% bootstrap intervals{size}: " + "; ".join(cells), ""]


def run_report(metrics: dict, config: dict, spec) -> str:
    parts = [
        f"# {metrics['method']} on {metrics['dataset']}",
        "",
        spec.description,
        "",
        *[line for warning in metrics.get("warnings", []) for line in (f"> **Warning:** {warning}", "")],
        "## Metrics",
        "",
        metrics_table([("valid", metrics.get("valid", {})), ("test", metrics.get("test", {}))]),
        "",
        "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["seconds"].items()),
        "",
        *interval_lines(metrics.get("test", {})),
    ]
    if spec.report is not None:
        parts += [spec.report(metrics), ""]
    parts += ["## Config", "", "```yaml", cfg.dump(config).rstrip(), "```", ""]
    return "\n".join(parts)
