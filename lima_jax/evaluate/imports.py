"""Votes collected elsewhere (a crowd platform such as MTurk or Prolific), read from JSONL or CSV.

Each row: `item` (the prompt's 0-based index in the study), `a` and `b` (the two systems'
names) and `winner` (`a`'s or `b`'s name, or `tie`). A row naming an unknown item or system is
refused with its line number, and then no row of the file is stored.
"""

import csv
import io
import json

from etils import epath

from lima_jax.errors import LimaError
from lima_jax.evaluate.protocol import TIE
from lima_jax.evaluate.store import Study


def read_rows(path: str) -> list[tuple[int, dict]]:
  """(line number, row) for every row of a .csv (with a header line) or JSONL file."""
  if not epath.Path(path).is_file():
    raise LimaError(f"--file: {path}: no such file")
  text = epath.Path(path).read_text()
  if path.lower().endswith(".csv"):
    reader = csv.DictReader(io.StringIO(text))
    return [(reader.line_num, row) for row in reader]
  rows = []
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise LimaError(f"{path}:{number}: invalid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise LimaError(f"{path}:{number}: expected a JSON object")
      rows.append((number, row))
  return rows


def import_votes(study: Study, rater: str, path: str) -> tuple[int, int]:
  """Stores the file's votes as `rater`'s, all in one transaction; (stored, already there)."""
  items, systems = len(study.items()), set(study.systems())
  votes = []
  for number, row in read_rows(path):
    where = f"{path}:{number}"
    missing = [k for k in ("item", "a", "b", "winner") if row.get(k) in (None, "")]
    if missing:
      raise LimaError(f"{where}: no `{missing[0]}`")
    try:
      item = int(row["item"])
    except (TypeError, ValueError):
      raise LimaError(f"{where}: item {row['item']!r} is not a number") from None
    if not 0 <= item < items:
      raise LimaError(f"{where}: unknown item {item} (the study's items are 0-{items - 1})")
    a, b, winner = str(row["a"]), str(row["b"]), str(row["winner"])
    for name in (a, b):
      if name not in systems:
        raise LimaError(f"{where}: unknown system {name!r} (systems: "
                        f"{', '.join(sorted(systems))})")
    if a == b:
      raise LimaError(f"{where}: `a` and `b` are the same system {a!r}")
    if winner not in (a, b, TIE):
      raise LimaError(f"{where}: winner {winner!r} is neither {a!r}, {b!r} nor 'tie'")
    votes.append((item, a, b, winner))
  stored = 0
  with study.write() as db:
    for item, a, b, winner in votes:
      stored += study.add_vote(db, rater=rater, origin="import", mode="pairwise", item=item,
                               sample=0, system=a, opponent=b, left=None, choice=winner)
  return stored, len(votes) - stored
