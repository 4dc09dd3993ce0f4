"""The audit's charts, drawn with matplotlib (Agg) as SVG: text as paths, so a chart needs no font to open.

Cosines of good builds sit at 0.99999..., where a linear axis shows nothing; every cosine is drawn as
``1 - cosine`` on a log axis (floored at 1e-12, where float64 stops resolving), so an order of magnitude of
drift is one grid line and "higher is worse" holds on every chart.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

FLOOR = 1e-12


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "forge-audit", "svg.fonttype": "path", "font.size": 9,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _svg(figure: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(figure)
    return buffer.getvalue()


def tick_label(value: float) -> str:
    """A log-axis tick as a person reads it: 0.05 or 20 in plain digits, 2e-7 or 1.5e-7 past them."""
    if 1e-3 <= value < 1e4:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def log_ticks(low: float, high: float) -> list[float]:
    """Tick values in [low, high]: every decade past three decades (thinned to at most 12), 1-2-5 steps within
    three, every integer multiple of the decade within one."""
    decades = math.log10(high / low)
    subs = (1,) if decades > 3 else (1, 2, 5) if decades > 1 else range(1, 10)
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = [m * 10.0 ** e for e in exponents for m in subs if low <= m * 10.0 ** e * (1 + 1e-9) and
             m * 10.0 ** e <= high * (1 + 1e-9)]
    return ticks[::math.ceil(len(ticks) / 12)] if ticks else ticks


def log_axis(axis: Any) -> None:
    """Log y axis with at least three labelled ticks however narrow the data (matplotlib's own labels thin out
    to one or two, or to none, when the data sit within a decade or two). Call it after plotting.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis.set_yscale("log")
    low, high = axis.get_ylim()
    if len(log_ticks(low, high)) < 3:  # a sliver of one decade: widen it to integer multiples around it
        low = _step(low, -1)
        while len(log_ticks(low, high)) < 3:
            high = _step(high, +1)
        axis.set_ylim(low, high)
    axis.yaxis.set_major_locator(FixedLocator(log_ticks(low, high)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: tick_label(value)))
    axis.yaxis.set_minor_locator(LogLocator(base=10, subs="auto", numticks=12))
    axis.yaxis.set_minor_formatter(NullFormatter())


def _step(value: float, direction: int) -> float:
    """The integer multiple of its decade at or below `value` (direction -1), or the next one above it (+1)."""
    decade = 10.0 ** math.floor(math.log10(value) + 1e-9)
    multiple = math.floor(value / decade + 1e-9)
    return multiple * decade if direction < 0 else (multiple + 1) * decade


def gap(cosine: float | None) -> float:
    """1 - cosine, floored for a log axis (NaN stays NaN: a missing point, never a good one)."""
    if cosine is None or cosine != cosine:
        return float("nan")
    return max(1.0 - cosine, FLOOR)


def step_cosine_chart(curves: Sequence[tuple[str, Sequence[float]]], threshold: float | None, title: str) -> bytes:
    """One line per (prompt, graph run): 1 - cosine of the latents after each denoising step."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.0, 3.4))
    for label, cosines in curves:
        axis.plot(range(1, len(cosines) + 1), [gap(c) for c in cosines], marker="o", markersize=3, label=label)
    if threshold is not None:
        axis.axhline(gap(threshold), color="crimson", linestyle="--", linewidth=1,
                     label=f"gate: min step cosine {threshold:g}")
    log_axis(axis)
    axis.set_xlabel("denoising step")
    axis.set_ylabel("1 - cosine vs PyTorch (log)")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="best")
    return _svg(figure)


def blocks_chart(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """Error after every block: max|diff| and 1 - cosine against the block's position in the graph."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(" ".join(str(row[k]) for k in ("runner", "output") if k in row), []).append(row)
    for label, points in series.items():
        positions = range(len(points))
        left.plot(positions, [max(p["max_abs_diff"], FLOOR) for p in points], marker="o", markersize=3, label=label)
        right.plot(positions, [gap(p["cosine"]) for p in points], marker="o", markersize=3, label=label)
        if any(p.get("text_cosine") is not None for p in points):  # the text stream; none after the last block
            text = [p.get("text_max_abs_diff") for p in points]
            left.plot(positions, [max(t, FLOOR) if t is not None else float("nan") for t in text], linestyle="--",
                      marker="x", markersize=3, label=f"{label} text stream")
            right.plot(positions, [gap(p.get("text_cosine")) for p in points], linestyle="--", marker="x",
                       markersize=3, label=f"{label} text stream")
    names = [str(row["block"]) for row in next(iter(series.values()))]
    for axis, ylabel in ((left, "max |diff| (log)"), (right, "1 - cosine (log)")):
        log_axis(axis)
        axis.set_xlabel("block")
        axis.set_ylabel(ylabel)
        if len(names) <= 24:
            axis.set_xticks(range(len(names)), names, rotation=60 if len(names) > 8 else 0, fontsize=7)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    return _svg(figure)


def cross_recipe_chart(components: Sequence[dict[str, Any]], pipeline: Sequence[dict[str, Any]]) -> bytes:
    """Which recipe drifts where: per component (and end to end) one bar per recipe, worse is higher."""
    import numpy as np

    plt = _pyplot()
    recipes = list(dict.fromkeys([row["recipe"] for row in components] + [row["recipe"] for row in pipeline]))
    groups = list(dict.fromkeys(f"{row['component']}\n{row['output']}" for row in components))
    figure, axes = plt.subplots(1, 3, figsize=(12.0, 3.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    width = 0.8 / max(len(recipes), 1)
    lookup = {(row["recipe"], f"{row['component']}\n{row['output']}"): row for row in components}
    for offset, recipe in enumerate(recipes):
        x = np.arange(len(groups)) + (offset - (len(recipes) - 1) / 2) * width
        rows = [lookup.get((recipe, group)) for group in groups]
        axes[0].bar(x, [gap(r["min_cosine_similarity"]) if r else np.nan for r in rows], width, label=recipe)
        axes[1].bar(x, [max(r["max_error"] / r["max_error_gate"], r["rms_error"] / r["rms_error_gate"]) if r
                        else np.nan for r in rows], width, label=recipe)
    axes[1].axhline(1.0, color="crimson", linestyle="--", linewidth=1)
    for axis, ylabel in ((axes[0], "1 - min cosine vs PyTorch fp32 (log)"),
                         (axes[1], "error / its gate (log; gate at 1)")):
        axis.set_xticks(range(len(groups)), groups, fontsize=7)
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
        log_axis(axis)
    axes[0].set_title("component outputs: cosine")
    axes[1].set_title("component outputs: share of the tolerance")
    if pipeline:
        names = [row["recipe"] for row in pipeline]
        axes[2].bar(range(len(names)), [gap(row["min_step_cosine"]) for row in pipeline],
                    color=[f"C{recipes.index(n)}" for n in names])
        axes[2].set_xticks(range(len(names)), names, fontsize=7, rotation=20)
        log_axis(axes[2])
        axes[2].set_ylabel("1 - worst step cosine (log)")
    else:
        axes[2].text(0.5, 0.5, "no pipeline check", ha="center", va="center", transform=axes[2].transAxes)
    axes[2].set_title("end to end: denoising latents")
    return _svg(figure)
