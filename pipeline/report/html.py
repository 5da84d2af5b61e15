"""The building blocks of the report pages: one stylesheet, figures as PNG data URIs, escaped table
rows. Pages built from these need no server, no scripts and no network."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from matplotlib.figure import Figure

FIGSIZE, DPI = (6.4, 3.6), 100
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin:28px 0 4px;border-bottom:1px solid #ddd}p.why{color:#555;margin:2px 0 10px}
table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.teacher{background:#f4f4f4;font-style:italic}
img{max-width:100%;display:block;margin:6px 0}.note{color:#a60}code{font-size:12px}"""


def section(title: str, why: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2><p class='why'>{html.escape(why)}</p>{body}"


def img(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="">'


def fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def row(cells: list[str], num_from: int, cls: str = "") -> str:
    """A table row; cells from `num_from` on are numbers, right-aligned."""
    tds = "".join(f"<td{' class=n' if i >= num_from else ''}>{html.escape(c)}</td>" for i, c in enumerate(cells))
    return f"<tr class='{cls}'>{tds}</tr>"


def table(header: list[str], rows: list[str]) -> str:
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>"
