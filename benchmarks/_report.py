"""Markdown tables and PNG plots from a run's results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._stats import Summary, fmt_num, fmt_ratio, fmt_summary, paired_ratios
from ._suite import BenchResult, Metric, Table

RATIO_NOTE = (
    "Ratios are *nspool's advantage*: peer time / nspool time, or nspool rate / peer rate, "
    "computed per repeat from measurements of the same run (peers interleaved in every repeat), "
    "shown as median [min–max]. Above 1: nspool is better. Where a table compares with another "
    "row (its ratio column says which), the ratio is that row's figure over the baseline's."
)


def _ratio(table: Table, peer: str, m: Metric) -> Summary:
    base = table.baseline
    if base is None or peer == base:
        return Summary.of([])
    return Summary.of(
        paired_ratios(table.values[peer][m.key], table.values[base][m.key], m.higher_is_better)
    )


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = ["---"] + ["--:"] * (len(header) - 1)
    return [_row(header), _row(align), *(_row(r) for r in rows)]


def summary_lines(results: Sequence[BenchResult], kind: str) -> list[str]:
    """One row per figure, one column per peer: 'median (ratio×)'."""
    tables = [(r, t) for r in results if r.bench.summary for t in r.tables if t.kind == kind]
    peers: list[str] = []
    for _, t in tables:
        peers += [p for p in t.values if p not in peers]
    if not peers:
        return []
    rows = []
    for r, t in tables:
        for m in t.metrics:
            cells = [f"{r.bench.name}: {m.key} ({m.unit})"]
            for p in peers:
                if p not in t.values:
                    cells.append("–")
                    continue
                s = Summary.of(t.values[p][m.key])
                q = _ratio(t, p, m)
                cells.append(fmt_num(s.median) + (f" ({q.median:.2f}×)" if q.n else ""))
            rows.append(cells)
    return _grid(["figure", *peers], rows)


def table_lines(table: Table) -> list[str]:
    header = ["pool"]
    for m in table.metrics:
        header += [f"{m.key} ({m.unit})", table.ratio_label]
    rows = []
    for peer, per_metric in table.values.items():
        cells = [peer]
        for m in table.metrics:
            cells += [fmt_summary(Summary.of(per_metric[m.key])), fmt_ratio(_ratio(table, peer, m))]
        rows.append(cells)
    lines = _grid(header, rows)
    notes = [f"- {p}: not measured ({why})" for p, why in table.missing.items()]
    for p, errs in table.errors.items():
        uniq = list(dict.fromkeys(errs))
        notes.append(f"- **{p}: {len(errs)} failed measurement(s)**: " + "; ".join(uniq[:3]))
    for p, left in table.leftovers.items():
        notes.append(f"- **{p} left processes behind** (killed): " + "; ".join(left[:5]))
    notes += [f"- {n}" for n in table.notes]
    return lines + ([""] + notes if notes else [])


def markdown(results: Sequence[BenchResult], meta: dict[str, str], plots: dict[str, str]) -> str:
    out = [f"# nspool benchmarks, {meta['date']}", ""]
    out += _grid(["", ""], [[k, v] for k, v in meta.items()])
    out += [
        "",
        "Every figure is the median over repeats with [min–max] across repeats; each repeat's "
        "figure is itself a median (per call) or a whole-batch rate. 2 workers per pool unless "
        "said otherwise. Method: `benchmarks/README.md`.",
        "",
        RATIO_NOTE,
        "",
    ]
    for kind, title in (("sync", "Summary: sync fronts"), ("async", "Summary: async fronts")):
        lines = summary_lines(results, kind)
        if lines:
            out += [f"## {title}", "", "Cells: median (nspool advantage).", "", *lines, ""]
    from ._goals import goal_lines

    out += [
        "## Latency goals (issue 13)",
        "",
        "Each goal's figure from this run's own tables, per repeat, median [min–max]; the "
        "verdict is the median's. Rows whose benchmarks did not run say so.",
        "",
        *goal_lines(results),
        "",
    ]
    for r in results:
        out += [f"## {r.bench.title}", "", r.bench.about, "", f"_Took {r.seconds:.0f} s._", ""]
        for t in r.tables:
            out += [f"### {t.kind} fronts", "", *table_lines(t), ""]
        if r.bench.name in plots:
            out += [f"![{r.bench.name}]({plots[r.bench.name]})", ""]
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------------
def _color(peer: str) -> str:
    return "tab:red" if peer.startswith("nspool") else "tab:blue"


BAR_COLUMNS = 3


def _lines(plt: Any, title: str, tables: Sequence[Table]) -> Any:
    """One panel per (table, series): each peer's median against ``Metric.x``, min–max bars."""
    panels = [
        (t, series, [m for m in t.metrics if m.series == series and m.x is not None])
        for t in tables
        for series in dict.fromkeys(m.series for m in t.metrics)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (t, series, metrics) in zip(axes[0], panels, strict=True):
        for i, (peer, per_metric) in enumerate(t.values.items()):
            xs, ys, lo, hi = [], [], [], []
            for m in metrics:
                s = Summary.of(per_metric[m.key])
                if s.n == 0 or m.x is None:
                    continue
                xs.append(m.x)
                ys.append(s.median)
                lo.append(s.median - s.lo)
                hi.append(s.hi - s.median)
            style = "-o" if peer.startswith("nspool") else ["--s", ":^", "-.v", "--D"][i % 4]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=peer, ms=4)
        unit = metrics[0].unit if metrics else ""
        ax.set_xticks(sorted({m.x for m in metrics if m.x is not None}))
        ax.set_xlabel("workers")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title}: {t.kind}, {series}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("median, bars: min–max over repeats", fontsize=9)
    return fig


def _rate(size: int, ms: float) -> float:
    """MiB/s moved by an echo of ``size`` bytes (both ways) taking ``ms``."""
    return 2 * size / (ms / 1e3) / (1 << 20)


def plot(result: BenchResult, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [t for t in result.tables if t.values]
    if not tables:
        return False
    if result.bench.plot == "payload":
        fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.5), squeeze=False)
        for ax, t in zip(axes[0], tables, strict=True):
            for i, (peer, per_metric) in enumerate(t.values.items()):
                xs, ys, lo, hi = [], [], [], []
                for m in t.metrics:
                    s = Summary.of(per_metric[m.key])
                    if s.n == 0 or m.size is None:
                        continue
                    mid = _rate(m.size, s.median)
                    xs.append(m.size)
                    ys.append(mid)
                    lo.append(mid - _rate(m.size, s.hi))
                    hi.append(_rate(m.size, s.lo) - mid)
                style = "-o" if peer.startswith("nspool") else ["--s", ":^", "-.v", "--D"][i % 4]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=peer, ms=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("payload each way (bytes)")
            ax.set_ylabel("MiB/s (2 × size / median time)")
            ax.set_title(f"{result.bench.title}: {t.kind} fronts", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    elif result.bench.plot == "lines":
        fig = _lines(plt, result.bench.title, tables)
    else:
        # one row of panels per table, wrapped after BAR_COLUMNS metrics
        rows = [
            (t, list(t.metrics[i : i + BAR_COLUMNS]))
            for t in tables
            for i in range(0, len(t.metrics), BAR_COLUMNS)
        ]
        ncols = max(len(ms) for _, ms in rows)
        fig, axes = plt.subplots(
            len(rows), ncols, figsize=(5.2 * ncols, 0.45 * 8 * len(rows) + 1), squeeze=False
        )
        for row, (t, metrics) in zip(axes, rows, strict=True):
            for ax, m in zip(row, metrics, strict=False):
                peers = list(t.values)
                sums = [Summary.of(t.values[p][m.key]) for p in peers]
                med = [0.0 if math.isnan(s.median) else s.median for s in sums]
                err = [
                    [0.0 if s.n == 0 else s.median - s.lo for s in sums],
                    [0.0 if s.n == 0 else s.hi - s.median for s in sums],
                ]
                ax.barh(peers, med, xerr=err, color=[_color(p) for p in peers], capsize=3)
                ax.invert_yaxis()
                ax.set_title(f"{t.kind}: {m.key} ({m.unit})", fontsize=9)
                ax.tick_params(labelsize=7)
                ax.grid(True, axis="x", alpha=0.3)
            for ax in row[len(metrics) :]:
                ax.axis("off")
        fig.suptitle(f"{result.bench.title} — median, bars: min–max over repeats", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
