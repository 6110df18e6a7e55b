"""The HTML report's charts: cases per minute as inline SVG, and the axis-value
coverage heat map as HTML. Both return markup with every text escaped."""

import html
import math
from collections import Counter

from buildfuzz.report_data import Bucket, clean_text, sort_values

WIDTH, HEIGHT = 960, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 52
FUZZ_COLOUR, SHRINK_COLOUR = "#3b6fb6", "#e08a2c"
MIN_LABEL_WIDTH = 90
MAX_CELLS = 120
LABEL_WIDTH = 32
LIGHT, DARK = (239, 243, 255), (8, 48, 107)


def escape(text: object) -> str:
    return html.escape(clean_text(text), quote=True)


def nice_ceiling(value: float) -> float:
    """Return the smallest 1, 2 or 5 times a power of ten that is >= ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def rate_chart(buckets: list[Bucket]) -> str:
    """Return an SVG bar chart of cases per minute, fuzz and shrink stacked.

    Runs follow each other left to right, oldest first, with a gap between
    runs; each bar is one time bucket of one run.
    """
    if not buckets:
        return "<p>No case lines recorded.</p>"
    runs: dict[str, list[Bucket]] = {}
    for bucket in buckets:
        runs.setdefault(bucket.run_id, []).append(bucket)
    bar_width = (WIDTH - LEFT - RIGHT) / (len(buckets) + len(runs) - 1)
    peak = nice_ceiling(max((b.fuzz + b.shrink) / b.minutes for b in buckets))
    parts = [_axes(peak, buckets[0].minutes)]
    x = float(LEFT)
    for run_id, run_buckets in runs.items():
        parts.append(_run_label(run_id, x, len(run_buckets) * bar_width))
        for bucket in run_buckets:
            parts.append(_bar(bucket, x, bar_width, peak))
            x += bar_width
        x += bar_width
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" class="chart" '
        f'aria-label="cases per minute">{"".join(parts)}</svg>'
    )


def _y(value: float, peak: float) -> float:
    plot = HEIGHT - TOP - BOTTOM
    return TOP + plot * (1 - value / peak)


def _axes(peak: float, minutes: int) -> str:
    parts = []
    for fraction in (0, 0.2, 0.4, 0.6, 0.8, 1):
        value = peak * fraction
        y = _y(value, peak)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'class="grid"/><text x="{LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{value:g}</text>'
        )
    size = "minute" if minutes == 1 else f"{minutes}-minute bucket"
    parts.append(
        f'<text x="{LEFT}" y="{TOP - 10}">cases per minute (one bar per {size} '
        f"of each run, oldest run first)</text>"
        f'<rect x="{WIDTH - 190}" y="{TOP - 22}" width="12" height="12" '
        f'fill="{FUZZ_COLOUR}"/><text x="{WIDTH - 174}" y="{TOP - 12}">fuzz</text>'
        f'<rect x="{WIDTH - 120}" y="{TOP - 22}" width="12" height="12" '
        f'fill="{SHRINK_COLOUR}"/><text x="{WIDTH - 104}" y="{TOP - 12}">shrink</text>'
    )
    return "".join(parts)


def _run_label(run_id: str, x: float, width: float) -> str:
    """Return the run's separator line, and its id below the bars when the run
    is wide enough for the text."""
    line = (
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM + 6}" '
        f'class="run"/>'
    )
    if width < MIN_LABEL_WIDTH:
        return line
    return (
        f'{line}<text x="{x + 2:.1f}" y="{HEIGHT - BOTTOM + 18}" class="small">'
        f"{escape(run_id)}</text>"
    )


def _bar(bucket: Bucket, x: float, width: float, peak: float) -> str:
    fuzz_rate = bucket.fuzz / bucket.minutes
    total_rate = (bucket.fuzz + bucket.shrink) / bucket.minutes
    base, middle, top = _y(0, peak), _y(fuzz_rate, peak), _y(total_rate, peak)
    inner = max(width * 0.85, 0.5)
    title = (
        f"run {bucket.run_id}, minutes {bucket.start} to "
        f"{bucket.start + bucket.minutes}: {bucket.fuzz} fuzz and "
        f"{bucket.shrink} shrink cases"
    )
    return (
        f"<g><title>{escape(title)}</title>"
        f'<rect x="{x:.2f}" y="{middle:.2f}" width="{inner:.2f}" '
        f'height="{base - middle:.2f}" fill="{FUZZ_COLOUR}"/>'
        f'<rect x="{x:.2f}" y="{top:.2f}" width="{inner:.2f}" '
        f'height="{middle - top:.2f}" fill="{SHRINK_COLOUR}"/></g>'
    )


def heat_map(coverage: dict[str, Counter[str]], cases: int) -> str:
    """Return the coverage heat map: a row per axis, a cell per value.

    A cell's colour grows darker with the number of fuzz cases that took the
    value, relative to the most-taken value of the same axis.
    """
    if not coverage:
        return "<p>No case lines recorded.</p>"
    rows = [_heat_row(axis, coverage[axis], cases) for axis in sorted(coverage)]
    return f'<div class="heatmap">{"".join(rows)}</div>'


def _heat_row(axis: str, counter: Counter[str], cases: int) -> str:
    most_taken = Counter(dict(counter.most_common(MAX_CELLS)))
    peak = max(most_taken.values(), default=0)
    cells = [_heat_cell(axis, v, n, peak, cases) for v, n in sort_values(most_taken)]
    if not cells:
        cells.append('<span class="none">no value in any case</span>')
    hidden = len(counter) - len(most_taken)
    if hidden:
        cells.append(f'<span class="none">and {hidden} more values, each taken '
                     f"by fewer cases</span>")  # fmt: skip
    return (
        f'<div class="axis"><div class="axis-name">{escape(axis)}</div>'
        f'<div class="cells">{"".join(cells)}</div></div>'
    )


def _heat_cell(axis: str, value: str, count: int, peak: int, cases: int) -> str:
    fraction = count / peak if peak else 0.0
    colour = "#" + "".join(
        f"{round(low + (high - low) * fraction):02x}"
        for low, high in zip(LIGHT, DARK, strict=True)
    )
    text_colour = "#ffffff" if fraction > 0.5 else "#111111"
    label = value if value else "(empty)"
    short = label if len(label) <= LABEL_WIDTH else label[: LABEL_WIDTH - 1] + "…"
    share = f"{100 * count / cases:.0f}%" if cases else "-"
    title = f"{axis} = {label}: {count} fuzz cases ({share})"
    return (
        f'<span class="cell" style="background:{colour};color:{text_colour}" '
        f'title="{escape(title)}">{escape(short)}<b>{count}</b></span>'
    )
