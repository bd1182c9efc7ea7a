"""The selection report: one self-contained HTML page and its Markdown twin.

Dev generations of every epoch side by side, the loss, perplexity and learning-rate curves as
inline SVG (no plotting library, nothing to fetch), and the commands that export an epoch.
"""

import dataclasses
import html
import math
import re

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 560, 280, 64, 16, 30, 40


@dataclasses.dataclass
class Run:
  """What the report shows, as `lima_jax.select` gathers it from a workdir."""
  workdir: str
  steps: list[dict]  # metrics.jsonl: step, epoch, loss, lr, ...
  epochs: list[dict]  # epochs.jsonl: epoch, step, loss, dev_loss, dev_perplexity
  generations: dict[int, list[dict]]  # epoch -> generation records
  kept: dict[int, str]  # epoch -> where its params are
  chosen: dict | None


@dataclasses.dataclass(frozen=True)
class Series:
  name: str
  points: list[tuple[float, float]]
  dots: bool = False


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
  """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [low, high]."""
  if high <= low:
    return [low]
  raw = (high - low) / count
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.ceil(low / step) * step
  return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
  return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def svg_plot(title: str, xlabel: str, series: list[Series]) -> str:
  """A line chart with axes, ticks and a legend, as an <svg> element."""
  points = [p for s in series for p in s.points if math.isfinite(p[1])]
  if not points:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="60" role="img">'
            f'<title>{html.escape(title)}</title><text x="10" y="35">{html.escape(title)}: '
            'no data yet</text></svg>')
  x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
  y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
  if x1 == x0:
    x0, x1 = x0 - 1, x1 + 1
  pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
  y0, y1 = y0 - pad, y1 + pad
  sx = lambda x: _LEFT + (x - x0) / (x1 - x0) * (_W - _LEFT - _RIGHT)
  sy = lambda y: _H - _BOTTOM - (y - y0) / (y1 - y0) * (_H - _TOP - _BOTTOM)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
         f'viewBox="0 0 {_W} {_H}" role="img" font-family="sans-serif" font-size="11">',
         f"<title>{html.escape(title)}</title>",
         f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13">'
         f"{html.escape(title)}</text>",
         f'<rect x="{_LEFT}" y="{_TOP}" width="{_W - _LEFT - _RIGHT}" '
         f'height="{_H - _TOP - _BOTTOM}" fill="none" stroke="#999"/>']
  for y in _ticks(y0, y1):
    out.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
               f'stroke="#eee"/><text x="{_LEFT - 4}" y="{sy(y) + 4:.1f}" '
               f'text-anchor="end">{_fmt(y)}</text>')
  for x in _ticks(x0, x1):
    out.append(f'<text x="{sx(x):.1f}" y="{_H - _BOTTOM + 14}" '
               f'text-anchor="middle">{_fmt(x)}</text>')
  out.append(f'<text x="{_W / 2}" y="{_H - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
  legend = (f'<rect x="{_W - _RIGHT - 155}" y="{_TOP + 2}" width="153" '
            f'height="{14 * len(series) + 6}" fill="white" fill-opacity="0.85"/>')
  for i, s in enumerate(series):
    color = _COLORS[i % len(_COLORS)]
    xy = [(sx(x), sy(y)) for x, y in s.points if math.isfinite(y)]
    if len(xy) > 1:
      path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
      out.append(f'<polyline class="series" data-name="{html.escape(s.name)}" fill="none" '
                 f'stroke="{color}" stroke-width="1.5" points="{path}"/>')
    if s.dots or len(xy) == 1:
      out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in xy]
    ly = _TOP + 14 + 14 * i
    legend += (f'<line x1="{_W - _RIGHT - 150}" x2="{_W - _RIGHT - 130}" y1="{ly - 4}" '
               f'y2="{ly - 4}" stroke="{color}" stroke-width="2"/><text '
               f'x="{_W - _RIGHT - 125}" y="{ly}">{html.escape(s.name)}</text>')
  out += [legend, "</svg>"]  # drawn last: on top of the curves
  return "\n".join(out)


def _points(records: list[dict], x: str, y: str) -> list[tuple[float, float]]:
  return [(r[x], r[y]) for r in records if isinstance(r.get(y), (int, float))]


def plots(run: Run) -> dict[str, str]:
  """name -> SVG: the loss curves, dev perplexity and the learning rate."""
  return {
      "loss": svg_plot("Loss", "step", [
          Series("train loss (step)", _points(run.steps, "step", "loss")),
          Series("train loss (epoch mean)", _points(run.epochs, "step", "loss"), dots=True),
          Series("dev loss", _points(run.epochs, "step", "dev_loss"), dots=True)]),
      "perplexity": svg_plot("Dev perplexity", "epoch", [
          Series("dev perplexity", _points(run.epochs, "epoch", "dev_perplexity"), dots=True)]),
      "lr": svg_plot("Learning rate", "step", [Series("lr", _points(run.steps, "step", "lr"))]),
  }


def commands(run: Run, epoch: int | str = "E") -> list[str]:
  w = run.workdir
  return [f"python -m lima_jax.select --workdir={w} --choose={epoch}",
          f"python -m lima_jax.generate --workdir={w} --epoch={epoch} "
          f"--prompts=PROMPTS.jsonl --out=answers.jsonl"]


def _epoch_rows(run: Run) -> list[list[str]]:
  """Per epoch with anything to show: epoch, step, losses, perplexity, generations, params."""
  summary = {e["epoch"]: e for e in run.epochs}
  numbers = sorted(set(summary) | set(run.generations) | set(run.kept))
  chosen = (run.chosen or {}).get("epoch")
  num = lambda e, k: _fmt(e[k]) if isinstance(e.get(k), (int, float)) else "-"
  rows = []
  for n in numbers:
    e = summary.get(n, {})
    rows.append([f"{_label(n)} (chosen)" if n == chosen else _label(n), str(e.get("step", "-")),
                 num(e, "loss"), num(e, "dev_loss"), num(e, "dev_perplexity"),
                 str(len(run.generations.get(n, []))), run.kept.get(n, "not kept")])
  return rows


def _label(epoch: int) -> str:
  return "0 (before training)" if epoch == 0 else str(epoch)


_HEADERS = ["epoch", "step", "train loss", "dev loss", "dev perplexity", "generations", "params"]


def prompts_by_line(run: Run) -> list[tuple[dict, dict[int, dict]]]:
  """Each dev prompt once (by its line), with its generation per epoch."""
  prompts, answers = {}, {}
  for epoch in sorted(run.generations):
    for record in run.generations[epoch]:
      prompts.setdefault(record["line"], record)
      answers.setdefault(record["line"], {})[epoch] = record
  return [(prompts[line], answers[line]) for line in sorted(prompts)]


_CSS = """
body{font-family:sans-serif;margin:24px;color:#222} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.prompt{margin:24px 0;border-top:2px solid #888;padding-top:8px}
.grid{display:grid;grid-auto-flow:column;grid-auto-columns:minmax(300px,1fr);gap:8px;
overflow-x:auto}
.cell{border:1px solid #ccc;padding:6px;background:#fafafa} .chosen{border:2px solid #2ca02c}
.text{white-space:pre-wrap;font-family:inherit;margin:4px 0} .meta{color:#666;font-size:12px}
code{background:#f0f0f0;padding:2px 4px}
"""


def _esc(text) -> str:
  return html.escape(str(text))


def render_html(run: Run) -> str:
  chosen = (run.chosen or {}).get("epoch")
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>LIMA checkpoint selection: {_esc(run.workdir)}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>Checkpoint selection for <code>{_esc(run.workdir)}</code></h1>",
           "<p>LIMA chose its checkpoint by reading dev-set generations, not by perplexity. "
           "Read the answers below, then export the epoch you prefer:</p>",
           "".join(f"<pre><code>{_esc(c)}</code></pre>" for c in commands(run))]
  if chosen is not None:
    parts.append(f"<p><b>Chosen: epoch {_esc(chosen)}</b>, exported to "
                 f"<code>{_esc(run.chosen.get('export', ''))}</code>.</p>")
  parts.append('<h2>Epochs</h2><table id="epochs"><tr>' +
               "".join(f"<th>{h}</th>" for h in _HEADERS) + "</tr>")
  parts += ["<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>"
            for row in _epoch_rows(run)]
  parts.append('</table><h2>Curves</h2><div class="plots">')
  parts += [f'<figure id="plot-{name}">{svg}</figure>' for name, svg in plots(run).items()]
  parts.append("</div><h2>Dev generations</h2>")
  for prompt, answers in prompts_by_line(run):
    parts.append(f'<div class="prompt"><h3>Line {prompt["line"]} '
                 f'<span class="meta">{_esc(prompt.get("source", ""))}</span></h3>')
    for i, turn in enumerate(prompt.get("history", [])):
      parts.append(f'<p class="meta">{"user" if i % 2 == 0 else "assistant"}:</p>'
                   f'<div class="text">{_esc(turn)}</div>')
    parts.append(f'<div class="text"><b>{_esc(prompt["prompt"])}</b></div>')
    if prompt.get("reference"):
      parts.append(f'<details><summary>reference answer</summary><div class="text">'
                   f'{_esc(prompt["reference"])}</div></details>')
    parts.append('<div class="grid">')
    for epoch, record in sorted(answers.items()):
      mark = " chosen" if epoch == chosen else ""
      parts.append(f'<div class="cell{mark}" data-epoch="{epoch}">'
                   f'<b>Epoch {_esc(_label(epoch))}</b> '
                   f'<span class="meta">{record["tokens"]} tokens, stopped at '
                   f'{_esc(record["stopped"])}</span><div class="text">'
                   f'{_esc(record["generation"])}</div></div>')
    parts.append("</div></div>")
  parts.append("</body></html>\n")
  return "\n".join(parts)


def _fence(text: str) -> str:
  """A code fence longer than any run of backticks in the text."""
  return "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)


def render_markdown(run: Run, plot_files: dict[str, str]) -> str:
  """The report as Markdown; the plots are the SVG files named in plot_files."""
  chosen = (run.chosen or {}).get("epoch")
  lines = [f"# Checkpoint selection for `{run.workdir}`", "",
           "LIMA chose its checkpoint by reading dev-set generations, not by perplexity. "
           "Read the answers below, then export the epoch you prefer:", "", "```"]
  lines += commands(run) + ["```", ""]
  if chosen is not None:
    lines += [f"**Chosen: epoch {chosen}**, exported to `{run.chosen.get('export', '')}`.", ""]
  lines += ["## Epochs", "", "| " + " | ".join(_HEADERS) + " |",
            "|" + "---|" * len(_HEADERS)]
  lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
            for row in _epoch_rows(run)]
  lines += ["", "## Curves", ""]
  lines += [f"![{name}]({path})" for name, path in plot_files.items()]
  lines += ["", "## Dev generations", ""]
  for prompt, answers in prompts_by_line(run):
    lines += [f"### Line {prompt['line']} ({prompt.get('source', '')})", ""]
    for i, turn in enumerate(prompt.get("history", [])):
      lines += [f"*{'user' if i % 2 == 0 else 'assistant'}:*", "", _quote(turn), ""]
    lines += [_quote(prompt["prompt"]), ""]
    for epoch, record in sorted(answers.items()):
      text = record["generation"]
      fence = _fence(text)
      star = " (chosen)" if epoch == chosen else ""
      lines += [f"**Epoch {_label(epoch)}{star}** — {record['tokens']} tokens, stopped at "
                f"{record['stopped']}", "", fence, text, fence, ""]
  return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
  return "\n".join("> " + line for line in text.split("\n"))
