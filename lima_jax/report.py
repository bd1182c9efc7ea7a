"""The selection report: one self-contained HTML page and its Markdown twin.

Dev generations of every epoch beside each dev prompt, the loss, perplexity and learning-rate
curves as inline SVG (`lima_jax.svg_plot`), and the commands that export an epoch. Answers are
untrusted text: the page renders their Markdown with `lima_jax.markdown.to_html`, the renderer
every page of ours shows answers with.
"""

import dataclasses
import html
import re

from lima_jax import markdown
from lima_jax.svg_plot import Series, svg_plot


@dataclasses.dataclass
class Run:
  """What the report shows, as `lima_jax.select` gathers it from a workdir."""
  workdir: str
  steps: list[dict]  # metrics.jsonl: step, epoch, loss, lr, ...
  epochs: list[dict]  # epochs.jsonl: epoch, step, loss, dev_loss, dev_perplexity
  generations: dict[int, list[dict]]  # epoch -> generation records
  kept: dict[int, str]  # epoch -> where its params are
  chosen: dict | None


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


# Fixed decimals per column, so 2.000 never prints as "2" and the column lines up: losses in
# nats to 3 decimals, perplexities to 2 (as `python -m lima_jax.demo` prints them).
DECIMALS = {"loss": 3, "dev_loss": 3, "dev_perplexity": 2}


def number(record: dict, key: str) -> str:
  """record[key] with the key's fixed decimals (DECIMALS); "-" when absent."""
  value = record.get(key)
  return f"{value:.{DECIMALS[key]}f}" if isinstance(value, (int, float)) else "-"


def _epoch_rows(run: Run) -> list[list[str]]:
  """Per epoch with anything to show: epoch, step, losses, perplexity, generations, params."""
  summary = {e["epoch"]: e for e in run.epochs}
  numbers = sorted(set(summary) | set(run.generations) | set(run.kept))
  chosen = (run.chosen or {}).get("epoch")
  rows = []
  for n in numbers:
    e = summary.get(n, {})
    rows.append([f"{_label(n)} (chosen)" if n == chosen else _label(n), str(e.get("step", "-")),
                 number(e, "loss"), number(e, "dev_loss"), number(e, "dev_perplexity"),
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


def lowest_dev_loss(run: Run) -> int | None:
  """The generated epoch with the lowest dev loss (None without one)."""
  dev = {e["epoch"]: e["dev_loss"] for e in run.epochs
         if e.get("epoch") in run.generations and isinstance(e.get("dev_loss"), (int, float))}
  return min(dev, key=dev.get) if dev else None


# A run can generate at many epochs (45, say); a row of 45 answers per prompt is unreadable and
# hid the chosen epoch far to the right. So the page opens on a few epochs, the ones a reader
# compares first: the chosen one, the lowest dev loss, the first and the last of the selection
# window; one epoch picker for the whole page adds or removes epochs, every prompt alike, since
# LIMA's selection compares epochs across all prompts. The shown answers wrap onto rows that
# fit the window, never scrolled sideways. The picker is plain checkboxes with one CSS rule
# per epoch (:has), no script: without :has support every answer shows.
SHOWN_AT_START = 4


def shown_at_start(run: Run) -> list[int]:
  """The generated epochs the page shows before the reader picks (all when at most
  SHOWN_AT_START), ascending."""
  generated = sorted(run.generations)
  if len(generated) <= SHOWN_AT_START:
    return generated
  picks = {(run.chosen or {}).get("epoch"), lowest_dev_loss(run), generated[0], generated[-1]}
  return sorted(picks & set(generated))


_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;line-height:1.4;overflow-wrap:break-word}
pre{white-space:pre-wrap}  /* the commands name long workdir paths: wrap, never scroll */
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
#epochs td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0}
.picker{border:1px solid #ccc;padding:6px 10px;margin:8px 0}
.picker label{display:inline-block;margin:2px 10px 2px 0;white-space:nowrap}
.prompt{margin:24px 0;border-top:2px solid #888;padding-top:8px}
.question{background:#eef3f8;padding:2px 10px;border-left:4px solid #1f77b4}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:8px;
margin-top:8px}
.cell{border:1px solid #ccc;padding:6px 10px;background:#fafafa;min-width:0}
.chosen{border-color:#2ca02c;box-shadow:0 0 0 1px #2ca02c}
.meta{color:#666;font-size:12px} .cell>.meta{display:block}
.answer pre{white-space:pre-wrap;background:#f0f0f0;padding:6px} .answer{overflow-wrap:anywhere}
code{background:#f0f0f0;padding:1px 3px}
"""


def _esc(text) -> str:
  return html.escape(str(text))


def _picker_css(epochs: list[int]) -> str:
  return "".join(f'body:has(#show-{e}:not(:checked)) .cell[data-epoch="{e}"]{{display:none}}'
                 for e in epochs)


def _picker(run: Run) -> list[str]:
  """The epoch checkboxes above the dev generations; see SHOWN_AT_START."""
  chosen, best = (run.chosen or {}).get("epoch"), lowest_dev_loss(run)
  shown = set(shown_at_start(run))
  labels = []
  for e in sorted(run.generations):
    notes = [n for n, hit in (("chosen", e == chosen), ("lowest dev loss", e == best)) if hit]
    note = f" ({', '.join(notes)})" if notes else ""
    labels.append(f'<label><input type="checkbox" id="show-{e}"{" checked" * (e in shown)}> '
                  f'{_esc(_label(e) + note)}</label>')
  return ['<fieldset class="picker" id="epoch-picker"><legend>Epochs shown beside each prompt '
          f'({len(run.generations)} generated)</legend>', *labels, "</fieldset>"]


def _card(epoch: int, record: dict, summary: dict, chosen) -> str:
  mark = " chosen" if epoch == chosen else ""
  dev = f", dev loss {number(summary, 'dev_loss')}" if "dev_loss" in summary else ""
  return (f'<div class="cell{mark}" data-epoch="{epoch}"><b>Epoch {_esc(_label(epoch))}'
          f'{" (chosen)" if mark else ""}</b> <span class="meta">{record["tokens"]} tokens, '
          f'stopped at {_esc(record["stopped"])}{dev}</span><div class="answer">'
          f'{markdown.to_html(record["generation"])}</div></div>')


def render_html(run: Run) -> str:
  chosen = (run.chosen or {}).get("epoch")
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>LIMA checkpoint selection: {_esc(run.workdir)}</title>",
           f"<style>{_CSS}{_picker_css(sorted(run.generations))}</style></head><body>",
           f"<h1>Checkpoint selection for <code>{_esc(run.workdir)}</code></h1>",
           "<p>LIMA chose its checkpoint by reading dev-set generations, not by perplexity. "
           "Read the answers below, then export the epoch you prefer:</p>",
           "".join(f"<pre><code>{_esc(c)}</code></pre>" for c in commands(run))]
  if chosen is not None:
    parts.append(f"<p><b>Chosen: epoch {_esc(chosen)}</b>, exported to "
                 f"<code>{_esc(run.chosen.get('export', ''))}</code>.</p>")
  numeric = {2, 3, 4}  # columns of _HEADERS aligned right
  parts.append('<h2>Epochs</h2><table id="epochs"><tr>' +
               "".join(f"<th>{h}</th>" for h in _HEADERS) + "</tr>")
  parts += ["<tr>" + "".join(f'<td{" class=num" * (i in numeric)}>{_esc(c)}</td>'
                             for i, c in enumerate(row)) + "</tr>" for row in _epoch_rows(run)]
  parts.append('</table><h2>Curves</h2><div class="plots">')
  parts += [f'<figure id="plot-{name}">{svg}</figure>' for name, svg in plots(run).items()]
  parts.append("</div><h2>Dev generations</h2>")
  if run.generations:
    parts += _picker(run)
  summary = {e["epoch"]: e for e in run.epochs}
  for prompt, answers in prompts_by_line(run):
    parts.append(f'<div class="prompt" id="line-{prompt["line"]}"><h3>Line {prompt["line"]} '
                 f'<span class="meta">{_esc(prompt.get("source", ""))} · '
                 '<a href="#epoch-picker">epochs shown</a></span></h3>')
    for i, turn in enumerate(prompt.get("history", [])):
      parts.append(f'<p class="meta">{"user" if i % 2 == 0 else "assistant"}:</p>'
                   f'<div class="answer">{markdown.to_html(turn)}</div>')
    parts.append(f'<div class="question">{markdown.to_html(prompt["prompt"])}</div>')
    if prompt.get("reference"):
      parts.append(f'<details><summary>reference answer</summary><div class="answer">'
                   f'{markdown.to_html(prompt["reference"])}</div></details>')
    parts.append('<div class="grid">')
    parts += [_card(epoch, record, summary.get(epoch, {}), chosen)
              for epoch, record in sorted(answers.items())]
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
