"""The report every run leaves next to its output: OUT.summary.json, OUT.lengths.svg, and a
printed digest of both. It says what each filter removed, so a thin result can be explained."""

import collections
import json

import numpy as np

from lima_jax.curate import histogram, output


def complete(command: str, details: dict, records: list[dict], out: str) -> dict:
  """The command's own details plus what every command reports."""
  summary_path, svg_path = output.paths(out)
  prompts, responses = _lengths(records)
  return {
      "command": command,
      "output": out,
      "records": len(records),
      "per_source": dict(sorted(collections.Counter(r["source"] for r in records).items())),
      **details,
      "lengths": {"prompt": _stats(prompts), "response": _stats(responses)},
      "summary_file": summary_path,
      "histogram_file": svg_path,
  }


def _lengths(records: list[dict]) -> tuple[list[int], list[int]]:
  """Characters of each record's prompt and of its responses (every second turn)."""
  return ([len(r["conversations"][0]) for r in records],
          [sum(len(t) for t in r["conversations"][1::2]) for r in records])


def _stats(values: list[int]) -> dict:
  if not values:
    return {"min": 0, "median": 0, "max": 0}
  return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def write(summary: dict, records: list[dict]) -> None:
  """The summary JSON and the histogram of the records' prompt and response lengths."""
  prompts, responses = _lengths(records)
  output.write_text(summary["summary_file"],
                    json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
  output.write_text(summary["histogram_file"],
                    histogram.svg({"prompt": prompts, "response": responses}))


def describe(summary: dict) -> str:
  """The digest printed at the end of a run."""
  lines = [f"{summary['command']}: {summary['records']} records -> {summary['output']}"]
  lines.append("  per source: " + _pairs(summary["per_source"]))
  lines.append("  removed by filter (in the order applied):")
  width = max((len(k) for k in summary["removed"]), default=0)
  lines += [f"    {name:<{width}}  {count}" for name, count in summary["removed"].items()]
  for key in ("per_group", "per_category", "per_site", "per_file"):
    selected = {k: v.get("selected", v.get("kept", 0)) for k, v in summary.get(key, {}).items()}
    if key != "per_group":  # a dump can have a hundred sites; name only those that gave records
      selected = {k: n for k, n in selected.items() if n}
    if selected:
      lines.append(f"  {key.replace('_', ' ')} (selected): " + _pairs(selected))
  for group, counts in summary.get("per_group", {}).items():
    if counts["selected"] < counts["requested"]:
      lines.append(f"  note: {group} has {counts['selected']} of the {counts['requested']} "
                   "requested: its sites ran out of candidates that pass the filters")
  lengths = summary["lengths"]
  lines.append(f"  median length: prompt {lengths['prompt']['median']:.0f}, "
               f"response {lengths['response']['median']:.0f} characters")
  lines.append(f"  summary: {summary['summary_file']}  histogram: {summary['histogram_file']}")
  return "\n".join(lines)


def _pairs(counts: dict) -> str:
  return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
