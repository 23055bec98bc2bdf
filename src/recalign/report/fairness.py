"""Tables and plots of the fairness audits, from their metrics.json entries.

Prompt audit (`prompt_audit_markdown`, `prompt_audit_plots`, `prompt_audit_html`): SNSR / SNSV per
attribute and similarity at K_max with bootstrap intervals, the per-value means, and two figures: SNSR
against K per attribute (one panel per similarity) and a bar chart of SNSR at K_max per attribute.
Group audit (`group_audit_markdown`): per user group the mean metric with its interval, and the spread
with its permutation p-value.
"""

from __future__ import annotations

import html
import io

NAMES = {"jaccard": "Jaccard", "serp": "SERP*", "prag": "PRAG*"}


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci(pair) -> str:
    if not pair or any(v is None or v != v for v in pair):
        return ""
    return f" [{pair[0]:.3f}, {pair[1]:.3f}]"


def prompt_audit_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the SNSR / SNSV table (one row per attribute)."""
    audit = metrics.get("audit", {})
    k = audit.get("k")
    names = [m for m in ("jaccard", "serp", "prag") if m in metrics.get("attributes", {}).get(
        next(iter(metrics.get("attributes", {})), ""), {})]
    header = ["attribute", "values"] + [f"{NAMES[m]}@{k} SNSR [95% CI] (p; noise)" for m in names] + \
             [f"{NAMES[m]}@{k} SNSV" for m in names]
    rows = []
    for attribute, per_metric in metrics.get("attributes", {}).items():
        first = per_metric[names[0]] if names else {}
        row = [attribute, str(len(first.get("values", {})))]
        row += [_f(per_metric[m]["snsr"]) + _ci(per_metric[m].get("snsr_ci"))
                + (f" (p {_f(per_metric[m]['p_snsr'])}; {_f(per_metric[m].get('null_snsr_mean'))})"
                   if per_metric[m].get("p_snsr") is not None else "") for m in names]
        row += [_f(per_metric[m]["snsv"]) for m in names]
        rows.append(row)
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def value_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    k = metrics.get("audit", {}).get("k")
    header = ["attribute", "value"] + [f"{NAMES[m]}@{k}" for m in NAMES] + ["no list"]
    unparsable = metrics.get("generation", {}).get("unparsable_by_value", {})
    rows = []
    for attribute, per_metric in metrics.get("attributes", {}).items():
        values = per_metric.get("jaccard", {}).get("values", {})
        for value in values:
            rows.append([attribute, value] + [_f(per_metric.get(m, {}).get("values", {}).get(value)) for m in NAMES]
                        + [str(unparsable.get(value, 0))])
    return header, rows


def setup_lines(metrics: dict) -> list[str]:
    audit, gen = metrics.get("audit", {}), metrics.get("generation", {})
    model = audit.get("model", "?") + (f" + adapter {audit['adapter']}" if audit.get("adapter") else "")
    lines = [
        f"Model {model}; {audit.get('entities')} entities ({audit.get('entities_used')} with a neutral list), "
        f"{audit.get('values')} distinct values + neutral = {audit.get('prompts')} prompts, K = {audit.get('k')}, "
        f"greedy decoding. SERP* on the {'reference code' if audit.get('serp_scale') == 'reference' else 'spec'}'s "
        "scale. Lower SNSR / SNSV = fairer; intervals: percentile bootstrap over entities "
        f"({audit.get('bootstrap')} resamples); p: share of shufflings of each entity's lists among the values "
        "with an SNSR at least as large, and the mean SNSR of those shufflings (what noise alone gives).",
        "",
        f"Generation: {_f(gen.get('parsed_share'))} of answers hold a list ({gen.get('unparsable', 0)} without); "
        f"{_f(gen.get('mean_titles'), 1)} distinct titles per list on average "
        f"({_f(gen.get('full_lists_share'))} reach K); {_f(gen.get('grounded_share'))} of listed titles are "
        f"catalogue titles; {gen.get('distinct_titles', 0)} distinct titles over all lists; "
        f"{_f(gen.get('prompts_per_second'), 2)} prompts/s ({_f(gen.get('seconds'), 1)} s generating in this process).",
    ]
    return lines


def _cell_text(text: str, limit: int = 160) -> str:
    """Text for a Markdown table cell: escaped, one line, no column break."""
    return html.escape(" ".join(text.split()))[:limit].replace("|", "\\|")


def prompt_audit_markdown(metrics: dict, plots: dict | None = None) -> str:
    header, rows = prompt_audit_rows(metrics)
    vheader, vrows = value_rows(metrics)
    parts = ["## Fairness (FaiRLLM prompt audit)", "", *setup_lines(metrics), "",
             "### Spread over the values of each attribute", "", _md_table(header, rows), ""]
    for name in (plots or metrics.get("plots", [])):
        parts += [f"![{name}]({name})", ""]
    parts += ["### Mean similarity to the neutral list per value", "", _md_table(vheader, vrows), ""]
    examples = metrics.get("examples", [])
    if examples:
        parts += ["### Example lists (first entity)", "", "| value | first titles |", "|---|---|"]
        parts += [f"| {e['value']} | {_cell_text('; '.join(e['titles'][:5]))} |" for e in examples]
        parts.append("")
    return "\n".join(parts)


def prompt_audit_plots(metrics: dict) -> dict[str, bytes]:
    """{file name: PNG bytes}: SNSR vs K per attribute (a panel per similarity) and SNSR at K_max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = metrics.get("attributes", {})
    if not attributes:
        return {}
    k = metrics["audit"]["k"]
    out = {}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    for ax, metric in zip(axes, NAMES):
        for attribute, per_metric in attributes.items():
            curve = [float("nan") if v is None else v for v in per_metric[metric]["curve_snsr"]]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=2.5, label=attribute)
        ax.set_title(f"{NAMES[metric]} SNSR vs K", fontsize=10)
        ax.set_xlabel("K")
    axes[0].set_ylabel("SNSR (max - min over values)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    out["fairness-snsr-vs-k.png"] = _png(fig, plt)

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(attributes) + 2), 3.4))
    width = 0.8 / len(NAMES)
    for j, metric in enumerate(NAMES):
        values = [_number(attributes[a][metric]["snsr"]) for a in attributes]
        cis = [_interval(attributes[a][metric].get("snsr_ci"), v) for a, v in zip(attributes, values)]
        lows = [max(0.0, v - low) for v, (low, _) in zip(values, cis)]
        highs = [max(0.0, high - v) for v, (_, high) in zip(values, cis)]
        positions = [i + j * width for i in range(len(attributes))]
        ax.bar(positions, values, width, label=f"{NAMES[metric]}@{k}", yerr=[lows, highs], capsize=2)
        noise = [attributes[a][metric].get("null_snsr_mean") for a in attributes]
        if any(v is not None for v in noise):
            ax.scatter(positions, [float("nan") if v is None else v for v in noise], marker="_", s=120,
                       color="black", zorder=3, label="noise (shuffled values)" if j == 0 else None)
    ax.set_xticks([i + width for i in range(len(attributes))])
    ax.set_xticklabels(list(attributes), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"SNSR at K = {k}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["fairness-snsr.png"] = _png(fig, plt)
    return out


def _number(value) -> float:
    return 0.0 if value is None or value != value else float(value)


def _interval(pair, value: float) -> tuple[float, float]:
    if not pair or any(v is None or v != v for v in pair):
        return value, value
    return float(pair[0]), float(pair[1])


def _png(fig, plt) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def prompt_audit_html(metrics: dict, plots: dict[str, bytes], title: str) -> str:
    import base64

    header, rows = prompt_audit_rows(metrics)
    vheader, vrows = value_rows(metrics)
    images = "".join(f'<p><img alt="{html.escape(n)}" src="data:image/png;base64,{base64.b64encode(b).decode()}"></p>'
                     for n, b in plots.items())
    setup = "".join(f"<p>{html.escape(line)}</p>" for line in setup_lines(metrics) if line)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{setup}<h2>Spread over the values of each attribute</h2>"
            f"{_html_table(header, rows)}{images}<h2>Mean similarity to the neutral list per value</h2>"
            f"{_html_table(vheader, vrows)}</body></html>\n")


# ------------------------------------------------------------------------------------ group audit
def group_audit_markdown(metrics: dict) -> str:
    groups = metrics.get("groups", {})
    if not groups:
        return ""
    parts = ["## Fairness over user groups", "",
             "Per group: test cases, mean metric and a 95% percentile bootstrap interval. SNSR = max - min of "
             "the group means, SNSV = their population std; p = share of label shufflings (same group sizes) "
             "whose SNSR is at least as large, and the SNSR shuffled labels give on average (noise alone).", ""]
    for attribute, per_metric in groups.items():
        for metric, entry in per_metric.items():
            s = entry["spread"]
            parts += [f"### {attribute}: {metric}", "",
                      f"SNSR {_f(s.get('snsr'), 4)} (p = {_f(s.get('p_snsr'), 3)}; noise alone "
                      f"{_f(s.get('null_snsr_mean'), 4)}, 95th percentile {_f(s.get('null_snsr_95'), 4)}), "
                      f"SNSV {_f(s.get('snsv'), 4)} (p = {_f(s.get('p_snsv'), 3)})", "",
                      "| group | n | mean [95% CI] |", "|---|---|---|"]
            parts += [f"| {g} | {e['n']} | {_f(e['mean'], 4)}{_ci(e.get('ci'))} |" for g, e in entry["groups"].items()]
            parts.append("")
    return "\n".join(parts)
