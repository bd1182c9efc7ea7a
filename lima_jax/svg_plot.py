"""Line charts as inline SVG for the pages we write: no plotting library, nothing to fetch.

The legend sits below the plot area, never over a curve: a legend inside the frame hid the
dev-loss points of the selection report's loss plot whatever corner it took.
"""

import dataclasses
import html
import math

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 560, 280, 64, 16, 30, 40
_LEGEND_ROW = 16  # px per legend line
_CHAR = 6.5  # px: a generous mean glyph width of 11 px sans-serif, for laying out the legend
_SWATCH = 26  # px: the legend's line sample and the gap after it


@dataclasses.dataclass(frozen=True)
class Series:
  """One curve: its legend name, (x, y) points (non-finite y skipped), dots at each point."""
  name: str
  points: list[tuple[float, float]]
  dots: bool = False


def ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
  """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]; steps
  of at least 1 when `whole` (an axis of epochs or steps has no epoch 0.2)."""
  if high <= low:
    return [low]
  step = _tick_step(low, high, count)
  step = max(step, 1) if whole else step
  return [i * step for i in range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1)]


def _tick_step(low: float, high: float, count: int) -> float:
  raw = (high - low) / count
  power = 10 ** math.floor(math.log10(raw))
  return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def tick_labels(values: list[float]) -> list[str]:
  """Labels with one number of decimals for the whole axis (2.0, 2.5, 3.0; never 2, 2.5, 3),
  enough to tell neighbouring ticks apart; scientific notation for very large or small."""
  if not values:
    return []
  biggest = max(abs(v) for v in values)
  step = min((abs(b - a) for a, b in zip(values, values[1:])), default=0) or biggest or 1
  if biggest >= 1e5 or 0 < biggest < 1e-3:  # 5.0e-05, 4.5e-05: the mantissa to the step's digit
    digits = max(0, math.floor(math.log10(biggest)) - math.floor(math.log10(step) + 1e-9))
    return [f"{v:.{digits}e}" for v in values]
  decimals = max(0, -math.floor(math.log10(step) + 1e-9))
  return [f"{v:.{decimals}f}" for v in values]


def _legend_rows(names: list[str], width: float) -> list[list[int]]:
  """Indices of the series on each legend line: entries side by side while they fit."""
  rows, used = [[]], 0.0
  for i, name in enumerate(names):
    entry = _SWATCH + _CHAR * len(name) + 16
    if rows[-1] and used + entry > width:
      rows.append([])
      used = 0.0
    rows[-1].append(i)
    used += entry
  return rows


def svg_plot(title: str, xlabel: str, series: list[Series]) -> str:
  """A line chart (<svg> element, str) with axes, ticks and a legend below the x axis."""
  points = [p for s in series for p in s.points if math.isfinite(p[1])]
  if not points:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="60" role="img">'
            f'<title>{html.escape(title)}</title><text x="10" y="35">{html.escape(title)}: '
            'no data yet</text></svg>')
  # Legend entries for the series with points; each keeps its colour, COLORS[its index].
  named = [i for i, s in enumerate(series) if any(math.isfinite(y) for _, y in s.points)]
  rows = [[named[j] for j in row]
          for row in _legend_rows([series[i].name for i in named], _W - _LEFT - _RIGHT)]
  height = _H + _LEGEND_ROW * len(rows)
  x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
  y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
  if x1 == x0:
    x0, x1 = x0 - 1, x1 + 1
  pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
  y0, y1 = y0 - pad, y1 + pad
  sx = lambda x: _LEFT + (x - x0) / (x1 - x0) * (_W - _LEFT - _RIGHT)
  sy = lambda y: _H - _BOTTOM - (y - y0) / (y1 - y0) * (_H - _TOP - _BOTTOM)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
         f'viewBox="0 0 {_W} {height}" role="img" font-family="sans-serif" font-size="11">',
         f"<title>{html.escape(title)}</title>",
         f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13">'
         f"{html.escape(title)}</text>",
         f'<rect class="frame" x="{_LEFT}" y="{_TOP}" width="{_W - _LEFT - _RIGHT}" '
         f'height="{_H - _TOP - _BOTTOM}" fill="none" stroke="#999"/>']
  y_ticks = ticks(y0, y1)
  for y, label in zip(y_ticks, tick_labels(y_ticks)):
    out.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
               f'stroke="#eee"/><text x="{_LEFT - 4}" y="{sy(y) + 4:.1f}" '
               f'text-anchor="end">{label}</text>')
  x_ticks = ticks(x0, x1, whole=all(float(p[0]).is_integer() for p in points))
  for x, label in zip(x_ticks, tick_labels(x_ticks)):
    out.append(f'<text x="{sx(x):.1f}" y="{_H - _BOTTOM + 14}" '
               f'text-anchor="middle">{label}</text>')
  out.append(f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle">{html.escape(xlabel)}</text>')
  for i, s in enumerate(series):
    color = COLORS[i % len(COLORS)]
    xy = [(sx(x), sy(y)) for x, y in s.points if math.isfinite(y)]
    if len(xy) > 1:
      path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
      out.append(f'<polyline class="series" data-name="{html.escape(s.name)}" fill="none" '
                 f'stroke="{color}" stroke-width="1.5" points="{path}"/>')
    if s.dots or len(xy) == 1:
      out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in xy]
  out.append('<g class="legend">')
  for row, members in enumerate(rows):
    x, y = float(_LEFT), _H + _LEGEND_ROW * row + 2
    for i in members:
      color, name = COLORS[i % len(COLORS)], series[i].name
      out.append(f'<line x1="{x:.1f}" x2="{x + 20:.1f}" y1="{y - 4}" y2="{y - 4}" '
                 f'stroke="{color}" stroke-width="2"/><text x="{x + _SWATCH:.1f}" y="{y}">'
                 f"{html.escape(name)}</text>")
      x += _SWATCH + _CHAR * len(name) + 16
  out += ["</g>", "</svg>"]
  return "\n".join(out)
