"""A length histogram as a self-contained SVG: one panel per series, drawn by hand so that
curating needs no plotting library."""

from xml.sax.saxutils import escape

import numpy as np

_PANEL_W, _PANEL_H = 420, 260
_MARGIN = {"left": 56, "right": 16, "top": 34, "bottom": 44}
_COLORS = ("#4c72b0", "#dd8452", "#55a868")


def svg(series: dict[str, list[int]], bins: int = 20, unit: str = "characters") -> str:
  """Side-by-side histograms of each named series of lengths."""
  panels = [_panel(name, np.asarray(values, dtype=np.int64), bins, unit, i)
            for i, (name, values) in enumerate(series.items())]
  width = _PANEL_W * max(len(panels), 1)
  return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{_PANEL_H}" '
          f'viewBox="0 0 {width} {_PANEL_H}" font-family="sans-serif" font-size="11">\n'
          f'<rect width="{width}" height="{_PANEL_H}" fill="white"/>\n'
          + "".join(panels) + "</svg>\n")


def _panel(name: str, values: np.ndarray, bins: int, unit: str, index: int) -> str:
  x0 = index * _PANEL_W + _MARGIN["left"]
  plot_w = _PANEL_W - _MARGIN["left"] - _MARGIN["right"]
  plot_h = _PANEL_H - _MARGIN["top"] - _MARGIN["bottom"]
  base = _MARGIN["top"] + plot_h
  title = f"{name} length ({unit}), n={len(values)}"
  out = [f'<g class="panel" id="{escape(name)}">\n',
         f'<text x="{x0 + plot_w / 2}" y="20" text-anchor="middle" font-size="13">'
         f'{escape(title)}</text>\n',
         f'<line x1="{x0}" y1="{base}" x2="{x0 + plot_w}" y2="{base}" stroke="black"/>\n',
         f'<line x1="{x0}" y1="{_MARGIN["top"]}" x2="{x0}" y2="{base}" stroke="black"/>\n']
  if len(values):
    high = max(int(values.max()), 1)
    counts, edges = np.histogram(values, bins=bins, range=(0, high))
    top = max(int(counts.max()), 1)
    bar_w = plot_w / bins
    color = _COLORS[index % len(_COLORS)]
    for i, count in enumerate(counts):
      h = plot_h * count / top
      out.append(f'<rect class="bar" x="{x0 + i * bar_w:.1f}" y="{base - h:.1f}" '
                 f'width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" fill="{color}">'
                 f'<title>{edges[i]:.0f}-{edges[i + 1]:.0f}: {count}</title></rect>\n')
    for frac in (0.0, 0.5, 1.0):
      out.append(f'<text x="{x0 + plot_w * frac:.1f}" y="{base + 16}" text-anchor="middle">'
                 f'{high * frac:.0f}</text>\n')
    out.append(f'<text x="{x0 - 6}" y="{_MARGIN["top"] + 4}" text-anchor="end">{top}</text>\n')
    out.append(f'<text x="{x0 - 6}" y="{base}" text-anchor="end">0</text>\n')
  out.append(f'<text x="{x0 + plot_w / 2}" y="{_PANEL_H - 8}" text-anchor="middle">'
             f'{escape(unit)} (median {int(np.median(values)) if len(values) else 0})</text>\n')
  out.append("</g>\n")
  return "".join(out)
