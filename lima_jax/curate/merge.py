"""Merging curated files into one training set, without asking the same question twice.

Inputs are GAIR/lima JSONL files (what `stackexchange` and `wikihow` write, or LIMA's own), read
and checked by the trainer's own reader so that a merged file is one the trainer accepts. The
first record with a given normalised prompt wins, in the order the files are given.
"""

import collections
import os
import re
import unicodedata

from lima_jax.data import conversations

_NOT_WORD = re.compile(r"[\W_]+")


def normalise_prompt(prompt: str) -> str:
  """Case, punctuation, width and spacing variants of a prompt map to one key."""
  text = unicodedata.normalize("NFKC", prompt).casefold()
  return _NOT_WORD.sub(" ", text).strip()


def curate(paths: list[str]) -> tuple[list[dict], dict]:
  """(records, summary) of the deduplicated union of the files."""
  seen = set()
  records = []
  per_file, per_source_in = {}, collections.Counter()
  duplicates = 0
  for path in paths:
    raw = conversations.read_source(path)
    # A record without a source is named after its file, so the per-source counts stay useful.
    fallback = os.path.splitext(os.path.basename(path))[0]
    kept = 0
    parsed = conversations.parse_conversations(raw, path)
    for record in parsed:
      source = record.source or fallback
      per_source_in[source] += 1
      key = normalise_prompt(record.turns[0])
      if key in seen:
        duplicates += 1
        continue
      seen.add(key)
      kept += 1
      records.append({"conversations": list(record.turns), "source": source})
    per_file[path] = {"records": len(parsed), "kept": kept}
  summary = {
      "settings": {"inputs": list(paths)},
      "removed": {"duplicate_prompt": duplicates},
      "per_file": per_file,
      "per_source_in": dict(sorted(per_source_in.items())),
  }
  return records, summary
