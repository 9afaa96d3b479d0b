"""The load report as a page a person can open: self-contained HTML with inline SVG.

No script, no stylesheet, no font from the network: the file alone is the chart.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Sequence

__all__ = ["render_chart"]

WIDTH, HEIGHT = 820, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 36, 28, 40
HTTP_COLOR, DELIVERY_COLOR = "#2563eb", "#dc2626"
# Percentiles on the distribution chart's axis: x is the number of nines, log10(100 / (100 - p)).
NINES = [(0, "0%"), (1, "90%"), (2, "99%"), (3, "99.9%"), (4, "99.99%"), (5, "99.999%")]
MAX_NINES = 5

Line = tuple[str, str, Sequence[tuple[float, float]], bool]  # label, colour, points, dashed
# Inline, so the file stays the whole page; on a narrow screen the charts scale down
# (each SVG has a viewBox), the table scrolls inside its own box and long lines wrap.
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:860px;margin:1em auto;padding:0 .8em;color:#111}"
    "h1{font-size:1.4em}h2{font-size:1.1em}p,li{overflow-wrap:anywhere}"
    "svg{max-width:100%;height:auto}"
    ".table{overflow-x:auto}table{border-collapse:collapse}td,th{padding:0 .6em;text-align:right}"
    "td:first-child{text-align:left}"
    "pre{font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere}"
    "@media (max-width:600px){h1{font-size:1.15em}td,th{padding:0 .3em}}"
)


def render_chart(report: dict[str, Any]) -> str:
    """The page for a ``balancesim.load`` report: latency over time, throughput, distributions."""
    series, verdict = report["series"], report["verdict"]
    over_time: list[Line] = []
    for name, color in (("http", HTTP_COLOR), ("delivery", DELIVERY_COLOR)):
        label = "HTTP" if name == "http" else "mutation → delivery"
        over_time.append((f"{label} p50", color, [(p["t"], p["p50_ms"]) for p in series[name]], False))
        over_time.append((f"{label} p99", color, [(p["t"], p["p99_ms"]) for p in series[name]], True))
    bucket_s = series["bucket_s"]
    # The last bucket is cut short by the end of the run: its rate would read as a collapse.
    full = [p for p in series["http"] if p["t"] + bucket_s <= report["duration_s"]]
    throughput: list[Line] = [("HTTP calls/s", HTTP_COLOR, [(p["t"], p["count"] / bucket_s) for p in full], False)]
    distribution: list[Line] = [
        (label, color, [(_nines(p), ms) for p, ms in report["distribution"][name]], False)
        for name, label, color in (("http", "HTTP", HTTP_COLOR), ("delivery", "mutation → delivery", DELIVERY_COLOR))
    ]
    title = (f"balancesim load: {report['users']} users, {report['duration_s']} s — "
             f"{'in sync' if verdict['ok'] else 'OUT OF SYNC'}")
    return (
        "<!doctype html><html lang='en'><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        "<body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{report['ok_ops']} operations ({report['throughput_ops_per_s']}/s), {report.get('refused', 0)} refused, {report['errors']} errors; "
        f"setup {report['setup_s']} s; {verdict['messages']} messages to {verdict['sessions']} sessions, "
        f"{verdict['reconnects']} reconnects; {html.escape(verdict.get('ledger', ''))}</p>"
        + _problems(verdict)
        + _table(report)
        + _chart("Latency over time (ms; solid p50, dashed p99)", over_time, "seconds", None)
        + _chart("Throughput over time", throughput, "seconds", None)
        + _chart("Latency distribution (ms by percentile)", distribution, "percentile", NINES)
        + "<h2>Report</h2><pre>"
        + html.escape(json.dumps({k: v for k, v in report.items() if k not in ("series", "distribution")}, indent=2))
        + "</pre></body></html>"
    )


def _nines(percentile: float) -> float:
    return min(MAX_NINES, math.log10(100 / max(100 - percentile, 10.0 ** -MAX_NINES * 100)))


def _problems(verdict: dict[str, Any]) -> str:
    if not verdict["problems"]:
        return ""
    items = "".join(f"<li>{html.escape(p)}</li>" for p in verdict["problems"])
    return f"<h2>Problems</h2><ul style='color:{DELIVERY_COLOR}'>{items}</ul>"


def _table(report: dict[str, Any]) -> str:
    keys = ("count", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")
    head = "".join(f"<th>{k.removesuffix('_ms')}</th>" for k in keys)
    rows = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{report[name].get(k, '–')}</td>" for k in keys) + "</tr>"
        for name, label in (("http_latency", "HTTP (ms)"), ("delivery_latency", "mutation → delivery (ms)"))
    )
    return f"<div class='table'><table><tr><th></th>{head}</tr>{rows}</table></div>"


def _chart(title: str, lines: list[Line], x_label: str, x_ticks: list[tuple[float, str]] | None) -> str:
    points = [pt for _, _, pts, _ in lines for pt in pts]
    if not points:
        return f"<h2>{html.escape(title)}</h2><p>no samples</p>"
    x_max = max((t for t, _ in x_ticks), default=0) if x_ticks else max(x for x, _ in points) or 1
    y_max = _nice_top(max(y for _, y in points))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float, y: float) -> str:
        return f"{LEFT + x / x_max * plot_w:.1f},{TOP + plot_h - y / y_max * plot_h:.1f}"

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
             f"viewBox='0 0 {WIDTH} {HEIGHT}' role='img' "
             f"aria-label='{html.escape(title)}' font-size='11'>"]
    for y in _ticks(y_max):
        at = TOP + plot_h - y / y_max * plot_h
        parts.append(f"<line x1='{LEFT}' x2='{WIDTH - RIGHT}' y1='{at:.1f}' y2='{at:.1f}' stroke='#e5e7eb'/>"
                     f"<text x='{LEFT - 6}' y='{at + 4:.1f}' text-anchor='end'>{y:g}</text>")
    for x, label in x_ticks or [(x, f"{x:g}") for x in _ticks(x_max)]:
        at = LEFT + x / x_max * plot_w
        parts.append(f"<line x1='{at:.1f}' x2='{at:.1f}' y1='{TOP}' y2='{TOP + plot_h}' stroke='#f3f4f6'/>"
                     f"<text x='{at:.1f}' y='{TOP + plot_h + 16}' text-anchor='middle'>{label}</text>")
    parts.append(f"<text x='{LEFT + plot_w / 2}' y='{HEIGHT - 6}' text-anchor='middle'>{x_label}</text>")
    for i, (label, color, pts, dashed) in enumerate(lines):
        dash = " stroke-dasharray='5 3'" if dashed else ""
        if pts:
            parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.6'{dash} "
                         f"points='{' '.join(px(x, y) for x, y in pts)}'/>")
        legend_x = LEFT + 8 + i * 190
        parts.append(f"<line x1='{legend_x}' x2='{legend_x + 18}' y1='12' y2='12' stroke='{color}' stroke-width='2'{dash}/>"
                     f"<text x='{legend_x + 22}' y='16'>{html.escape(label)}</text>")
    parts.append("</svg>")
    return f"<h2>{html.escape(title)}</h2>" + "".join(parts)


def _step(top: float) -> float:
    """A round tick step (1, 2 or 5 × 10ⁿ) giving about five ticks up to ``top``."""
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _nice_top(value: float) -> float:
    if value <= 0:
        return 1.0
    step = _step(value)
    return math.ceil(value / step) * step


def _ticks(top: float) -> list[float]:
    step = _step(top)
    return [round(i * step, 10) for i in range(int(top / step + 1e-9) + 1)]
