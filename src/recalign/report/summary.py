"""The `recalign reproduce` report: report.md and report.html with one table per seed table and plots."""

from __future__ import annotations

import base64
import html
import io
import re
from collections import defaultdict
from pathlib import Path

from recalign.report.markdown import metrics_table
from recalign.io import atomic_write_text

HEADLINE = ["auc", "uauc", "auc_warm", "auc_cold", "ndcg@10", "hr@10", "ndcg@20", "hr@20", "recall@10", "mrr@10"]
AUDIT = re.compile(r"^(jaccard|serp|prag)@\d+$")  # FaiRLLM's list similarities (neutral vs attribute-stated)


QUICK_NOISE = ("Quick profile: one seed, short training and small test sets (a few hundred samples or fewer), so "
               "its numbers carry a few hundredths of noise (see the intervals); the full profile scores Yes/No "
               "methods on 2,000 test samples.")


def is_count(key: str) -> bool:
    """A count stored beside the test metrics (test-set size `n`, `n_warm`, `uauc_skipped_users_cold`), not a
    metric."""
    return key == "n" or key.startswith(("n_", "uauc_skipped_users"))


def with_intervals(metrics: dict, columns: list[str]) -> dict:
    """Each column's value as text, with its `<column>_ci` interval when the run recorded one."""
    out = {}
    for column in columns:
        value, interval = metrics.get(column), metrics.get(f"{column}_ci")
        if isinstance(value, float) and interval and len(interval) == 2:
            span = "undefined" if None in interval else f"{interval[0]:.3f}, {interval[1]:.3f}"
            out[column] = f"{value:.4f} [{span}]"
        else:
            out[column] = value
    return out


def _counting_rows(rows, columns: list[str]) -> list[tuple[str, dict]]:
    """The counting baselines the runs report (`baselines.<name>` with `counting: true`), once per name and
    test-set size: the floor beside the table's models."""
    seen, out = set(), []
    for _, metrics in rows:
        for name, baseline in metrics.get("baselines", {}).items():
            if not (isinstance(baseline, dict) and baseline.get("counting")):
                continue
            key = (name, baseline.get("test", {}).get("n"))
            if key not in seen:
                seen.add(key)
                out.append((f"{name} (counting baseline, no model)", with_intervals(baseline["test"], columns)))
    return out


def _headline_columns(results) -> list[str]:
    """The accuracy metrics the rows have; for a fairness audit also its similarities and the SNSR (spread
    between a sensitive attribute's groups) of its first metric per attribute."""
    present: dict[str, None] = {}
    for _, metrics in results:
        present.update(dict.fromkeys(metrics.get("test", {})))
    columns = [c for c in HEADLINE if c in present] + [c for c in present if AUDIT.match(c)]
    if columns:
        columns += [c for c in present if c.startswith(f"{columns[0]}_snsr_")]
    return columns


def _bar_plot_png(title: str, labels: list[str], values: list[float], metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 3))
    ax.bar(range(len(values)), values, color="#4C72B0")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def written_by_reproduce(path: Path) -> bool:
    """True for a report.md or report.html that `write_reproduce_report` wrote (known by its title)."""
    title = {"report.md": "# recalign reproduce (", "report.html": "<h1>recalign reproduce ("}.get(path.name)
    if title is None or not path.is_file():
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(2048).decode("utf-8", errors="replace")
    except OSError:
        return False
    return head.startswith(title) if path.suffix == ".md" else title in head


def write_reproduce_report(out: Path, profile: str, results) -> Path:
    groups = defaultdict(list)
    for exp, metrics in results:
        groups[exp.table or exp.method].append((exp, metrics))
    md = [f"# recalign reproduce ({profile} profile)", "",
          "Each row is one run directory under this folder; numbers are test-split metrics with their 95% "
          "bootstrap interval in brackets where the run has one.", ""]
    body = [f"<h1>recalign reproduce ({html.escape(profile)} profile)</h1>"]
    if profile == "quick":
        md += [QUICK_NOISE, ""]
        body.append(f"<p><strong>{html.escape(QUICK_NOISE)}</strong></p>")
    for table, rows in groups.items():
        columns = _headline_columns(rows)
        md += [f"## {table}", "", metrics_table([(e.name, with_intervals(m["test"], columns)) for e, m in rows]
                                                + _counting_rows(rows, columns), columns),
               "", "Wall seconds: " + ", ".join(f"{e.name} {m['seconds'].get('total', 0):.0f}" for e, m in rows), ""]
        body.append(f"<h2>{html.escape(table)}</h2>")
        body.append(_html_table(rows, columns))
        if columns:
            metric = columns[0]
            values = [float(m["test"].get(metric) or 0.0) for _, m in rows]
            png = _bar_plot_png(table, [e.name for e, _ in rows], values, metric)
            body.append(f'<img alt="{html.escape(table)} {metric}" src="data:image/png;base64,{png}">')
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>recalign report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    atomic_write_text(out / "report.html", page)
    return out / "report.md"


def _html_table(rows, columns) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    lines = [head]
    for exp, metrics in rows:
        cells = "".join(f"<td>{_cell(with_intervals(metrics['test'], columns).get(c))}</td>" for c in columns)
        lines.append(f"<tr><th>{html.escape(exp.name)}</th>{cells}</tr>")
    return "<table>" + "".join(lines) + "</table>"


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
