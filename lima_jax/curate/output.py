"""Where a run's files go and how they are written: OUT, OUT.summary.json and OUT.lengths.svg."""

import json
import os

from lima_jax.errors import LimaError


def paths(out: str) -> tuple[str, str]:
  """(summary JSON, histogram SVG) beside `out`: train.jsonl -> train.summary.json, ..."""
  stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
  return stem + ".summary.json", stem + ".lengths.svg"


def write_text(path: str, text: str) -> None:
  try:
    parent = os.path.dirname(path)
    if parent:
      os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  except OSError as e:
    raise LimaError(f"cannot write {path}: {e.strerror or e}") from None


def write_records(path: str, records: list[dict]) -> None:
  """GAIR/lima JSONL, one record a line, UTF-8 kept readable."""
  write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
