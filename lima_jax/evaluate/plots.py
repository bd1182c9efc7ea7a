"""The evaluation report's charts as inline SVG, in the selection report's style (its colours,
ticks and number format, `lima_jax.svg_plot`): Figure 1's stacked win / tie / loss bars with
their intervals, and plain horizontal bars (helpfulness means, answer lengths)."""

import html
import math

from lima_jax.svg_plot import COLORS, tick_labels, ticks

_W, _ROW, _LABEL, _RIGHT, _TOP, _BOTTOM = 760, 26, 340, 24, 42, 34
_LABEL_CHARS = 54  # what fits left of the bars at 11 px sans-serif (about 6 px a character)
STACKCOLORS = {"win": COLORS[2], "tie": "#bbbbbb", "loss": COLORS[1],
                "fail": COLORS[1], "pass": "#bbbbbb", "excellent": COLORS[2]}


def _frame(title: str, rows: int) -> tuple[list[str], int]:
  height = _TOP + rows * _ROW + _BOTTOM
  return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
          f'viewBox="0 0 {_W} {height}" role="img" font-family="sans-serif" font-size="11">',
          f"<title>{_esc(title)}</title>",
          f'<text x="{_W / 2}" y="14" text-anchor="middle" font-size="13">{_esc(title)}</text>'
          ], height


def _row_label(label: str, y: float) -> str:
  """A bar's label, shortened with an ellipsis where it would run off the chart's left edge;
  the whole label shows as the tooltip."""
  shown = label if len(label) <= _LABEL_CHARS else label[:_LABEL_CHARS - 1] + "\u2026"
  return (f'<text x="{_LABEL - 6}" y="{y + 13}" text-anchor="end"><title>{_esc(label)}</title>'
          f"{_esc(shown)}</text>")


def _axis(out: list[str], height: int, low: float, high: float, sx, label: str) -> None:
  values = ticks(low, high)
  for x, text in zip(values, tick_labels(values)):
    out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{_TOP}" y2="{height - _BOTTOM}" '
               f'stroke="#eee"/><text x="{sx(x):.1f}" y="{height - _BOTTOM + 14}" '
               f'text-anchor="middle">{text}</text>')
  out.append(f'<text x="{(_LABEL + _W - _RIGHT) / 2}" y="{height - 6}" '
             f'text-anchor="middle">{_esc(label)}</text>')


def stacked(title: str, rows: list[dict], segments: tuple[str, ...],
            whiskers: dict[str, str] | None = None) -> str:
  """Horizontal bars of shares (0..1) stacked to 100%: rows are dicts with `label` and each
  segment's share; `whiskers` maps a segment to the row key of its (low, high) interval, drawn
  at that segment's outer edge (the first segment's right edge, the last one's left edge)."""
  if not rows:
    return _empty(title)
  out, height = _frame(title, len(rows))
  sx = lambda share: _LABEL + share * (_W - _LABEL - _RIGHT)
  _axis(out, height, 0, 100, lambda p: sx(p / 100), "% of items")
  for r, row in enumerate(rows):
    y = _TOP + r * _ROW + 4
    out.append(_row_label(row["label"], y))
    start = 0.0
    for name in segments:
      share = row[name]
      out.append(f'<rect class="bar" data-row="{_esc(row["label"])}" data-segment="{name}" '
                 f'x="{sx(start):.1f}" y="{y}" width="{sx(start + share) - sx(start):.1f}" '
                 f'height="{_ROW - 8}" fill="{STACKCOLORS.get(name, COLORS[0])}"/>')
      if share >= 0.06:
        out.append(f'<text x="{(sx(start) + sx(start + share)) / 2:.1f}" y="{y + 13}" '
                   f'text-anchor="middle" fill="white">{share * 100:.0f}</text>')
      start += share
    for n, (name, key) in enumerate((whiskers or {}).items()):
      low, high = row.get(key, (math.nan, math.nan))
      if not (math.isfinite(low) and math.isfinite(high)):
        continue
      if name == segments[-1]:
        low, high = 1 - high, 1 - low
      # Each interval on its own line (the first near the bar's top, the next near its bottom),
      # clear of the numbers in the middle.
      at = y + 2 + n * (_ROW - 12)
      out.append(f'<path class="ci" data-segment="{name}" d="M{sx(low):.1f},{at - 2:.1f}v4'
                 f'M{sx(low):.1f},{at:.1f}H{sx(high):.1f}M{sx(high):.1f},{at - 2:.1f}v4" '
                 'stroke="#222" stroke-width="1.2" fill="none"/>')
  out.append(_legend(segments))
  out.append("</svg>")
  return "\n".join(out)


def bars(title: str, xlabel: str, rows: list[dict], *, low: float | None = None,
         high: float | None = None) -> str:
  """Horizontal bars of `value` per `label`, with an interval (`ci`: low, high) when given."""
  if not rows:
    return _empty(title)
  out, height = _frame(title, len(rows))
  ends = [v for r in rows for v in (r["value"], *r.get("ci", ())) if math.isfinite(v)]
  x0 = 0.0 if low is None else low
  x1 = (max(ends, default=1.0) * 1.05 or 1.0) if high is None else high
  sx = lambda v: _LABEL + (v - x0) / (x1 - x0) * (_W - _LABEL - _RIGHT)
  _axis(out, height, x0, x1, sx, xlabel)
  for r, row in enumerate(rows):
    y = _TOP + r * _ROW + 4
    out.append(_row_label(row["label"], y) +
               f'<rect class="bar" data-row="{_esc(row["label"])}" x="{sx(x0):.1f}" '
               f'y="{y}" width="{max(sx(row["value"]) - sx(x0), 0):.1f}" height="{_ROW - 8}" '
               f'fill="{COLORS[0]}"/>')
    ci = row.get("ci")
    if ci and all(math.isfinite(v) for v in ci):
      mid = y + (_ROW - 8) / 2
      out.append(f'<path class="ci" d="M{sx(ci[0]):.1f},{mid - 5:.1f}v10M{sx(ci[0]):.1f},'
                 f'{mid:.1f}H{sx(ci[1]):.1f}M{sx(ci[1]):.1f},{mid - 5:.1f}v10" stroke="#222" '
                 'fill="none"/>')
  out.append("</svg>")
  return "\n".join(out)


def _legend(segments) -> str:
  parts = []
  for i, name in enumerate(segments):
    x = _LABEL + i * 90
    parts.append(f'<rect x="{x}" y="25" width="10" height="8" '
                 f'fill="{STACKCOLORS.get(name, COLORS[0])}"/><text x="{x + 14}" '
                 f'y="33">{_esc(name)}</text>')
  return "".join(parts)


def _empty(title: str) -> str:
  return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="60" role="img">'
          f'<title>{_esc(title)}</title><text x="10" y="35">{_esc(title)}: no data yet</text>'
          "</svg>")


def _esc(text) -> str:
  return html.escape(str(text))
