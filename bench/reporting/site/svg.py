"""The site's drawing helpers: line plots and histograms as inline SVG, heatmaps as PNG.

Nothing here knows about checkpoints or the store; callers pass plain numbers.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib

# --- plots -------------------------------------------------------------------------------
# Hand-written SVG rather than matplotlib. The spec asks for matplotlib, but a site of
# 1,000 checkpoints has 4,000 plots and a 10 s budget. `python benchmarks/site_render.py
# --compare-matplotlib` draws the same plots both ways: matplotlib (Agg, one reused
# figure, only savefig timed) took 70-100 ms of CPU a plot on the 2-core dev machine,
# about 300 s for the site; these functions take about 0.2 ms, under a second. The plots
# are simple (lines with markers, two overlaid histograms), so a hundred lines of SVG do
# what matplotlib would, inline in the page, with hover titles on every point.
W, H = 360, 230
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 40
COLORS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000"]
_esc = html.escape


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _frame(xlabel: str, ylabel: str, xticks: list[tuple[float, str]], yticks: list[tuple[float, str]]) -> list[str]:
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="#fff" stroke="#999"/>',
    ]
    last = -1e9
    for px, text in xticks:
        out.append(f'<line x1="{px:.1f}" y1="{y0}" x2="{px:.1f}" y2="{y0 + 4}" stroke="#999"/>')
        if px - last >= 26:  # leave out labels that would overlap the previous one
            out.append(f'<text x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">{_esc(text)}</text>')
            last = px
    for py, text in yticks:
        out.append(f'<line x1="{x0}" y1="{py:.1f}" x2="{x1}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 5}" y="{py + 4:.1f}" text-anchor="end">{_esc(text)}</text>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{H - 6}" text-anchor="middle">{_esc(xlabel)}</text>')
    out.append(
        f'<text transform="translate(12 {(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle">{_esc(ylabel)}</text>'
    )
    return out


def _legend(out: list[str], names: list[str]) -> None:
    for i, name in enumerate(names):
        y = TOP + 14 + 14 * i
        color = COLORS[i % len(COLORS)]
        out.append(
            f'<line x1="{W - RIGHT - 128}" y1="{y - 4}" x2="{W - RIGHT - 112}" y2="{y - 4}" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{W - RIGHT - 108}" y="{y}">{_esc(name)}</text>')


def svg_lines(
    series: list[tuple[str, list[tuple]]],
    *,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    mark: float | None = None,
    legend: bool = True,
) -> str:
    """Lines with markers; y is an accuracy in [0, 1] drawn as a percentage.

    A point is (x, y), or (x, y, attributes) with a dict of attributes for its marker
    (`{"data-eps": "0.2"}`, escaped here) that a page's script or test can read, or
    (x, y, attributes, title) with the hover text in place of "line: x → y%" (a point
    that stands for something the axes do not show, the cell it added, say). Without
    `legend` the caller names the lines beside the plot, in the order of COLORS.
    """
    xs = [p[0] for _, pts in series for p in pts]
    if logx:
        xs = [x for x in xs if x > 0]
    f = math.log10 if logx else float
    lo, hi = f(min(xs)), f(max(xs))
    if mark is not None and not logx:
        lo, hi = min(lo, mark), max(hi, mark)
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP

    def px(x):
        return x0 + (f(x) - lo) / (hi - lo) * (x1 - x0)

    def py(y):
        return y0 - y * (y0 - y1)

    distinct = sorted(set(xs))
    values = (
        distinct
        if len(distinct) <= 8
        else ([10**k for k in range(math.ceil(lo), math.floor(hi) + 1)] if logx else _ticks(lo, hi))
    )
    out = _frame(
        xlabel, ylabel, [(px(v), f"{v:g}") for v in values], [(py(v / 100), f"{v:g}") for v in (0, 25, 50, 75, 100)]
    )
    if mark is not None:
        out.append(
            f'<line x1="{px(mark):.1f}" y1="{y0}" x2="{px(mark):.1f}" y2="{y1}" stroke="#666" stroke-dasharray="4 3"/>'
        )
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = [p for p in pts if p[0] > 0 or not logx]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, *_ in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y, *more in pts:
            attrs = "".join(f' {k}="{_esc(str(v))}"' for k, v in (more[0] if more else {}).items())
            title = more[1] if len(more) > 1 else f"{name}: {x:g} → {100 * y:.2f}%"
            out.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"{attrs}>'
                f"<title>{_esc(title)}</title></circle>"
            )
    if legend:
        _legend(out, [name for name, _ in series])
    out.append("</svg>")
    return "\n".join(out)


def svg_hist(edges: list[float], series: list[tuple[str, list[int]]], *, xlabel: str, ylabel: str) -> str:
    """Step histograms over shared bin edges, drawn over each other."""
    lo, hi = edges[0], edges[-1]
    top = max([max(counts) for _, counts in series if counts] + [1])
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP

    def px(x):
        return x0 + (x - lo) / ((hi - lo) or 1) * (x1 - x0)

    def py(y):
        return y0 - y / top * (y0 - y1)

    yticks = [v for v in _ticks(0, top, 4) if v <= top]
    out = _frame(
        xlabel,
        ylabel,
        [(px(v), f"{v:g}") for v in _ticks(lo, hi) if lo <= v <= hi],
        [(py(v), f"{v:g}") for v in yticks],
    )
    for i, (name, counts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = [f"{px(lo):.1f},{py(0):.1f}"]
        for left, right, c in zip(edges, edges[1:], counts, strict=False):  # edges has one more entry
            pts.append(f"{px(left):.1f},{py(c):.1f} {px(right):.1f},{py(c):.1f}")
        pts.append(f"{px(hi):.1f},{py(0):.1f}")
        out.append(
            f'<polygon points="{" ".join(pts)}" fill="{color}" fill-opacity="0.18" stroke="{color}" '
            f'stroke-width="1.5"><title>{_esc(name)}</title></polygon>'
        )
    _legend(out, [name for name, _ in series])
    out.append("</svg>")
    return "\n".join(out)


# --- heatmaps ----------------------------------------------------------------------------
# A perceptually ordered palette (viridis, five stops) for the loss heatmaps.
PALETTE = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _rgb(t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(t), len(PALETTE) - 2)
    f = t - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(PALETTE[i], PALETTE[i + 1], strict=True))
    return r, g, b


def heatmap_png(loss: list[list[float | None]], lo: float, hi: float) -> str:
    """One landscape as a PNG data URI, one pixel a grid point (the page scales it up
    with crisp edges): rows the adversarial direction (top −, bottom +), columns the
    random one, colour log(1 + loss) on a scale shared by the images. A 21 x 21 grid as
    SVG squares was 30 KB a picture, 240 KB a page; as PNG it is under 2 KB."""
    span = (math.log1p(hi) - math.log1p(lo)) or 1.0
    rows = []
    for row in loss:
        pixels = bytearray()
        for v in row:
            color = (153, 153, 153) if v is None else _rgb((math.log1p(v) - math.log1p(lo)) / span)
            pixels.extend(color)
        rows.append(bytes(pixels))
    return "data:image/png;base64," + base64.b64encode(_png(rows, len(loss[0]), len(loss))).decode()


def _png(rows: list[bytes], width: int, height: int) -> bytes:
    """An 8-bit RGB PNG from raw rows. Written out here (a signature and three chunks)
    rather than adding an imaging library as a dependency for one tiny picture type."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rows)  # filter type 0 (none) on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
