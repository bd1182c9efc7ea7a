"""A study's report: report.json (the numbers), report.html (self-contained, inline SVG) and
report.md (with its charts as report_<name>.svg), the numbers LIMA (Zhou et al. 2023) reports:

- pairwise: per system, opponent and rater source (`people`, or `judge:<model>`) the win / tie /
  loss shares of Figure 1 with 95% bootstrap intervals and "equal or preferred" (win + tie);
- agreement: tie-discounted accuracy between every two raters on the shared items (section 3);
- absolute: Fail / Pass / Excellent shares (section 4.3, Figure 3);
- helpfulness: mean 1-6 score with a 95% interval per system (section 5, Figure 5);
- lengths: answer length per system in words (judges favour long answers).
"""

import html
import json
import os

import numpy as np

from lima_jax.evaluate import plots, stats
from lima_jax.evaluate.store import Study

PEOPLE = "people"


def _pairs(study: Study):
  """(people's votes, judges' verdicts from both orders) as (rater, source, system, opponent,
  item, verdict, whether a judge's two orders disagreed (None for people)) tuples; a pair keeps
  the orientation it was first stored in."""
  oriented, rows = {}, []

  def orient(system, opponent):
    return oriented.setdefault(frozenset((system, opponent)), (system, opponent))

  for v in study.votes("pairwise"):
    rows.append((v["rater"], PEOPLE, *orient(v["system"], v["opponent"]), v["item"],
                 v["choice"], None))
  both = {}
  for j in study.judgements("pairwise"):
    if j["status"] == "ok":
      both.setdefault((j["judge"], j["system"], j["opponent"], j["item"]), {})[j["ord"]] = (
          j["verdict"])
  for (judge, system, opponent, item), verdicts in sorted(both.items()):
    if len(verdicts) == 2:
      rows.append((judge, judge, *orient(system, opponent), item,
                   stats.both_orders(verdicts[0], verdicts[1]), verdicts[0] != verdicts[1]))
  return rows


def gather(study: Study) -> dict:
  """Everything report.json holds."""
  seed = study.seed
  pairs = _pairs(study)
  groups, disagree = {}, {}
  for _, source, system, opponent, _, verdict, differ in pairs:
    groups.setdefault((system, opponent, source), []).append(stats.outcome(system, verdict))
    disagree.setdefault((system, opponent, source), []).append(differ)
  pairwise = []
  for key, outcomes in sorted(groups.items()):
    system, opponent, source = key
    share = stats.shares(outcomes)
    differ = disagree[key]
    pairwise.append(dict(
        system=system, opponent=opponent, rater=source, n=len(outcomes), **share,
        equal_or_preferred=share["win"] + share["tie"],
        # A judge's position bias: the share of pairs whose two orders disagreed (ties).
        orders_disagree=None if differ[0] is None else sum(differ) / len(differ),
        win_ci=stats.share_interval(outcomes, "win", seed=seed),
        tie_ci=stats.share_interval(outcomes, "tie", seed=seed),
        loss_ci=stats.share_interval(outcomes, "loss", seed=seed)))
  shared = {it["item"] for it in study.items() if it["shared"]}
  labels = {}
  for rater, _, system, opponent, item, verdict, _ in pairs:
    if item in shared:
      labels.setdefault(rater, {})[(system, opponent, item)] = verdict
  raters = sorted(labels)
  agreement = []
  for i, first in enumerate(raters):
    for second in raters[i + 1:]:
      n, accuracy = stats.tie_discounted_accuracy(labels[first], labels[second])
      if n:
        agreement.append(dict(raters=[first, second], n=n, tie_discounted_accuracy=accuracy))
  return dict(study=study.directory, pairwise=pairwise, agreement=agreement,
              absolute=_ratings(study, "absolute", seed), helpfulness=_ratings(
                  study, "helpfulness", seed), lengths=_lengths(study),
              judge_failures=_failures(study))


def _ratings(study: Study, mode: str, seed: int) -> list[dict]:
  scores = {}
  for v in study.votes(mode):
    scores.setdefault((v["system"], PEOPLE), []).append(v["choice"])
  for j in study.judgements(mode):
    if j["status"] == "ok":
      scores.setdefault((j["system"], j["judge"]), []).append(j["verdict"])
  rows = []
  for (system, rater), values in sorted(scores.items()):
    row = dict(system=system, rater=rater, n=len(values))
    if mode == "absolute":
      row.update({k: values.count(k) / len(values) for k in ("fail", "pass", "excellent")})
    else:
      numbers = [float(v) for v in values]
      row.update(mean=float(np.mean(numbers)), ci=stats.bootstrap_interval(numbers, seed=seed))
    rows.append(row)
  return rows


def _lengths(study: Study) -> list[dict]:
  rows = []
  for system in study.systems():
    words = [len(t.split()) for t in study.answers(system).values()]
    rows.append(dict(system=system, answers=len(words), mean_words=float(np.mean(words)),
                     median_words=float(np.median(words))))
  return rows


def _failures(study: Study) -> dict:
  with study.read() as db:
    return {judge: count for judge, count in db.execute(
        "SELECT judge, COUNT(*) FROM judgements WHERE status != 'ok' GROUP BY judge")}


def charts(data: dict) -> dict[str, str]:
  """name -> SVG."""
  pairwise = [dict(r, label=f"{r['system']} vs {r['opponent']} ({r['rater']})")
              for r in data["pairwise"]]
  absolute = [dict(r, label=f"{r['system']} ({r['rater']})") for r in data["absolute"]]
  helpful = [dict(label=f"{r['system']} ({r['rater']})", value=r["mean"], ci=r["ci"])
             for r in data["helpfulness"]]
  lengths = [dict(label=r["system"], value=r["mean_words"]) for r in data["lengths"]]
  return {
      "pairwise": plots.stacked("Preference (Figure 1): win / tie / loss", pairwise,
                                ("win", "tie", "loss"), {"win": "win_ci", "loss": "loss_ci"}),
      "absolute": plots.stacked("Absolute ratings (section 4.3)", absolute,
                                ("fail", "pass", "excellent")),
      "helpfulness": plots.bars("Helpfulness (section 5), mean with 95% interval",
                                "score (1-6)", helpful, low=1, high=6),
      "lengths": plots.bars("Answer length", "mean words per answer", lengths),
  }


def _pct(x) -> str:
  return f"{x * 100:.0f}%"


def _ci(pair) -> str:
  return f"[{pair[0] * 100:.0f}, {pair[1] * 100:.0f}]"


def tables(data: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
  """name -> (headers, rows of text): what both pages show under each chart."""
  return {
      "pairwise": (["system", "opponent", "rater", "n", "win", "tie", "loss",
                    "equal or preferred", "win 95% CI", "loss 95% CI", "orders disagree"],
                   [[r["system"], r["opponent"], r["rater"], str(r["n"]), _pct(r["win"]),
                     _pct(r["tie"]), _pct(r["loss"]), _pct(r["equal_or_preferred"]),
                     _ci(r["win_ci"]), _ci(r["loss_ci"]),
                     "-" if r["orders_disagree"] is None else _pct(r["orders_disagree"])]
                    for r in data["pairwise"]]),
      "agreement": (["raters", "shared items", "tie-discounted accuracy"],
                    [[" / ".join(r["raters"]), str(r["n"]), _pct(r["tie_discounted_accuracy"])]
                     for r in data["agreement"]]),
      "absolute": (["system", "rater", "n", "fail", "pass", "excellent"],
                   [[r["system"], r["rater"], str(r["n"]), _pct(r["fail"]), _pct(r["pass"]),
                     _pct(r["excellent"])] for r in data["absolute"]]),
      "helpfulness": (["system", "rater", "n", "mean", "95% CI"],
                      [[r["system"], r["rater"], str(r["n"]), f"{r['mean']:.2f}",
                        f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"] for r in data["helpfulness"]]),
      "lengths": (["system", "answers", "mean words", "median words"],
                  [[r["system"], str(r["answers"]), f"{r['mean_words']:.0f}",
                    f"{r['median_words']:.0f}"] for r in data["lengths"]]),
  }


_TITLES = {"pairwise": "Pairwise preference", "agreement": "Agreement on the shared items",
           "absolute": "Absolute ratings", "helpfulness": "Helpfulness",
           "lengths": "Answer lengths"}
_EMPTY = {"agreement": "No data yet: agreement needs two raters who both rated the shared items."}
_CSS = ("body{font-family:sans-serif;margin:24px;color:#222} table{border-collapse:collapse;"
        "margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}")


def render_html(data: dict) -> str:
  esc = lambda t: html.escape(str(t))
  svgs, parts = charts(data), []
  for name, (headers, rows) in tables(data).items():
    parts.append(f'<h2>{_TITLES[name]}</h2>')
    if name in svgs:
      parts.append(f'<figure id="plot-{name}">{svgs[name]}</figure>')
    if not rows and name not in svgs:  # a chart says so itself when it has nothing to draw
      parts.append(f"<p>{_EMPTY.get(name, 'No data yet.')}</p>")
    parts.append(f'<table id="table-{name}"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in headers)
                 + "</tr>" + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) +
                                     "</tr>" for row in rows) + "</table>")
  failures = "".join(f"<li>{esc(j)}: {n} request(s) without a verdict</li>"
                     for j, n in data["judge_failures"].items())
  return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>LIMA evaluation: '
          f'{esc(data["study"])}</title><style>{_CSS}</style></head><body><h1>Evaluation of '
          f'<code>{esc(data["study"])}</code></h1>' + (f"<ul>{failures}</ul>" if failures else "")
          + "\n".join(parts) + "</body></html>\n")


def render_markdown(data: dict, chart_files: dict[str, str]) -> str:
  lines = [f"# Evaluation of `{data['study']}`", ""]
  for name, (headers, rows) in tables(data).items():
    lines += [f"## {_TITLES[name]}", ""]
    if name in chart_files:
      lines += [f"![{name}]({chart_files[name]})", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines.append("")
  for judge, n in data["judge_failures"].items():
    lines.append(f"- {judge}: {n} request(s) without a verdict")
  return "\n".join(lines) + "\n"


def write(study: Study) -> dict:
  """Writes the three reports (and the Markdown's charts) into the study; returns the data."""
  data = gather(study)
  root = study.directory
  chart_files = {}
  for name, svg in charts(data).items():
    chart_files[name] = f"report_{name}.svg"
    _write(os.path.join(root, chart_files[name]), svg + "\n")
  _write(os.path.join(root, "report.json"), json.dumps(data, indent=2) + "\n")
  _write(os.path.join(root, "report.html"), render_html(data))
  _write(os.path.join(root, "report.md"), render_markdown(data, chart_files))
  return data


def _write(path: str, text: str) -> None:
  with open(path + ".partial", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".partial", path)
