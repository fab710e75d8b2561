#!/usr/bin/env python3
"""Latency CDF per contender as a small SVG, for `make bench` (bench/README.md).

    bench/cdf.py --out=FILE.svg [--title=TEXT] [--reference=NAME] [--note=TEXT] NAME=LATENCIES ...

LATENCIES is a file with one latency in microseconds per line (what
`loadgen rtt --out=` writes). Two panels share the x axis (latency, log
scale): the whole distribution, and its tail (90th to 100th percentile)
where p99 lives. The reference (the floor) is drawn black and bold, the
others in a colour-blind-safe palette and distinct dash patterns. Standard
library only: no plotting package to install.
"""

import math
import sys
from html import escape

# Okabe-Ito (without its black, kept for the reference): distinguishable
# with the common forms of colour blindness.
COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#999999"]
DASHES = ["6,3", "", "2,2", "8,3,2,3", "", "4,4", "1,3"]

WIDTH, HEIGHT = 1000, 470
TOP, BOTTOM, LEFT, GAP = 50, 60, 62, 70
LEGEND_W = 290
PANEL_W = (WIDTH - LEFT - GAP - LEGEND_W - 20) / 2
PANEL_H = HEIGHT - TOP - BOTTOM


def percentile(sorted_values, p):
    """Nearest rank, as loadgen computes it."""
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def steps_125(low, high):
    """The 1-2-5 values (in ms) between low and high."""
    values = []
    decade = 10 ** math.floor(math.log10(low))
    while decade <= high * 10:
        for m in (1, 2, 5):
            t = round(m * decade, 6)
            if low * 0.999 <= t <= high * 1.001:
                values.append(t)
        decade *= 10
    return values


def round_down_125(v):
    decade = 10 ** math.floor(math.log10(v))
    return max(m * decade for m in (1, 2, 5) if m * decade <= v * 1.0001)


def round_up_125(v):
    decade = 10 ** math.floor(math.log10(v))
    return min(m * decade for m in (1, 2, 5, 10) if m * decade >= v * 0.9999)


def label_ms(v):
    return f"{v:g}"


def main(argv):
    out, title, reference, note, series = None, "Connection latency", None, "", []
    for arg in argv:
        if arg.startswith("--note="):
            note = arg[len("--note="):]
            continue
        if arg.startswith("--reference="):
            reference = arg[len("--reference="):]
        elif arg.startswith("--out="):
            out = arg[len("--out="):]
        elif arg.startswith("--title="):
            title = arg[len("--title="):]
        elif "=" in arg:
            name, path = arg.split("=", 1)
            with open(path) as f:
                values = sorted(int(line) / 1000 for line in f if line.strip().isdigit())
            if values:
                series.append((name, values))
        else:
            sys.exit(f"cdf.py: unexpected argument {arg!r}\n{__doc__}")
    if out is None or not series:
        sys.exit(__doc__)
    styles = {}
    others = 0
    for name, _ in series:
        if name == reference:
            styles[name] = ("#000000", "", 2.8)
        else:
            styles[name] = (COLOURS[others % len(COLOURS)], DASHES[others % len(DASHES)], 1.8)
            others += 1

    def stroke(name):
        colour, dash, width = styles[name]
        dash = f' stroke-dasharray="{dash}"' if dash else ""
        return f'stroke="{colour}" stroke-width="{width}"{dash}'

    # x range: from the smallest latency to the largest p99.9, in whole
    # 1-2-5 steps, so that one stray outlier does not squash every curve.
    low = min(v[0] for _, v in series)
    high = max(percentile(v, 99.9) for _, v in series)
    x_lo = round_down_125(max(low, 1e-3))
    x_hi = round_up_125(max(high, x_lo * 2))
    lx_lo, lx_hi = math.log10(x_lo), math.log10(x_hi)
    grid = steps_125(x_lo, x_hi)
    # Over more than two decades, label only the powers of ten (and the
    # ends): 1-2-5 labels would run into each other.
    if lx_hi - lx_lo > 2.2:
        powers = [t for t in grid if abs(math.log10(t) - round(math.log10(t))) < 1e-9]
        # The ends too, unless they would run into a power of ten.
        ticks = sorted(powers + [t for t in (x_lo, x_hi)
                                 if all(abs(math.log10(t) - math.log10(p)) >= 0.34 for p in powers)])
    else:
        ticks = grid

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="13">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{escape(title)}</text>',
    ]

    panels = [(LEFT, 0.0, 100.0, 10.0, "all connections"), (LEFT + PANEL_W + GAP, 90.0, 100.0, 1.0, "tail: 90th–100th percentile")]
    for x0, y_lo, y_hi, y_step, caption in panels:
        def px(ms):
            ms = min(max(ms, x_lo), x_hi)
            return x0 + (math.log10(ms) - lx_lo) / (lx_hi - lx_lo) * PANEL_W

        def py(pct):
            return TOP + PANEL_H - (pct - y_lo) / (y_hi - y_lo) * PANEL_H

        svg.append(f'<text x="{x0 + PANEL_W / 2}" y="{TOP - 8}" text-anchor="middle">{escape(caption)}</text>')
        # Grid and axes.
        for t in grid:
            svg.append(f'<line x1="{px(t):.1f}" y1="{TOP}" x2="{px(t):.1f}" y2="{TOP + PANEL_H}" stroke="#ddd"/>')
            if t in ticks:
                svg.append(f'<text x="{px(t):.1f}" y="{TOP + PANEL_H + 16}" text-anchor="middle">{label_ms(t)}</text>')
        steps = int(round((y_hi - y_lo) / y_step))
        for i in range(steps + 1):
            pct = y_lo + i * y_step
            svg.append(f'<line x1="{x0}" y1="{py(pct):.1f}" x2="{x0 + PANEL_W}" y2="{py(pct):.1f}" stroke="#ddd"/>')
            svg.append(f'<text x="{x0 - 6}" y="{py(pct) + 4:.1f}" text-anchor="end">{pct:g}%</text>')
        for pct, name in ((50, "p50"), (99, "p99")):
            if y_lo < pct < y_hi:
                svg.append(f'<line x1="{x0}" y1="{py(pct):.1f}" x2="{x0 + PANEL_W}" y2="{py(pct):.1f}" stroke="#888" stroke-dasharray="3,3"/>')
                svg.append(f'<text x="{x0 + PANEL_W - 4}" y="{py(pct) - 4:.1f}" fill="#666" font-size="11" text-anchor="end">{name}</text>')
        svg.append(f'<rect x="{x0}" y="{TOP}" width="{PANEL_W:.1f}" height="{PANEL_H}" fill="none" stroke="#333"/>')
        svg.append(f'<text x="{x0 + PANEL_W / 2}" y="{HEIGHT - 22}" text-anchor="middle">latency, ms (log scale)</text>')
        svg.append(f'<text transform="translate({x0 - 46},{TOP + PANEL_H / 2}) rotate(-90)" text-anchor="middle">connections answered within (cumulative %)</text>')

        # Curves: a step function, thinned to at most ~600 points per panel.
        svg.append(f'<clipPath id="clip{int(x0)}"><rect x="{x0}" y="{TOP}" width="{PANEL_W:.1f}" height="{PANEL_H}"/></clipPath>')
        # The reference last, so that it is drawn on top.
        for name, values in sorted(series, key=lambda s: s[0] == reference):
            n = len(values)
            first = max(int(n * y_lo / 100) - 1, 0)
            stride = max((n - first) // 600, 1)
            points = []
            for k in list(range(first, n, stride)) + [n - 1]:
                pct = (k + 1) / n * 100
                points.append(f"{px(values[k]):.1f},{py(max(pct, y_lo)):.1f}")
            svg.append(
                f'<polyline clip-path="url(#clip{int(x0)})" fill="none" {stroke(name)} '
                f'points="{" ".join(points)}"/>'
            )

    # Legend, with each contender's p50 and p99 and the sample count.
    lx = WIDTH - LEGEND_W - 5
    svg.append(f'<text x="{lx}" y="{TOP + 4}" font-weight="bold">contender</text>')
    svg.append(f'<text x="{lx + LEGEND_W - 5}" y="{TOP + 4}" text-anchor="end" font-weight="bold">p50 / p99 ms</text>')
    for i, (name, values) in enumerate(series):
        y = TOP + 26 + i * 22
        svg.append(f'<line x1="{lx}" y1="{y - 4}" x2="{lx + 28}" y2="{y - 4}" {stroke(name)}/>')
        label = f"{name} (reference)" if name == reference else name
        svg.append(f'<text x="{lx + 34}" y="{y}">{escape(label)}</text>')
        svg.append(
            f'<text x="{lx + LEGEND_W - 5}" y="{y}" text-anchor="end">'
            f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f}</text>"
        )
    n_note = ", ".join(sorted({str(len(v)) for _, v in series}))
    svg.append(f'<text x="{lx}" y="{TOP + 26 + len(series) * 22 + 10}" font-size="11" fill="#555">{n_note} connections each,</text>')
    svg.append(f'<text x="{lx}" y="{TOP + 26 + len(series) * 22 + 25}" font-size="11" fill="#555">one at a time (warm test)</text>')
    if note:
        svg.append(f'<text x="{lx}" y="{TOP + 26 + len(series) * 22 + 40}" font-size="11" fill="#555">{escape(note)}</text>')
    svg.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
