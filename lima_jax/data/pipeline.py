"""From a JSONL file to training examples: read through TFDS, fix up turn counts, tokenize.

Records that need fixing are counted and reported once per file, not once per record, so a
large file with a common quirk does not flood the log.
"""

import collections

from absl import logging
import numpy as np

from lima_jax.data.chat_format import ChatTokenizer, Example
from lima_jax.data.lima_dataset import read_conversations
from lima_jax.errors import LimaError

# Report lines, keyed by what happened to a record; "{n} record(s)" is prepended.
_NOTES = {
    "odd": "with an odd number of turns lost {its} trailing user turn",
    "no_assistant": "with no assistant turn {were} skipped",
    "trimmed": "{were} trimmed to max_length={max_length} tokens",
    "trimmed_away": ("{were} skipped: no trained token left after trimming to "
                     "max_length={max_length}"),
}


def load_examples(path: str, tokenizer: ChatTokenizer, *, max_length: int,
                  train_on_prompt: bool, data_dir: str,
                  what: str = "data.train_path") -> list[Example]:
  """Every usable record of `path` as an Example, in file order."""
  if max_length < 2:
    raise LimaError(f"data.max_length: must be at least 2 tokens, got {max_length}")
  counts = collections.Counter()
  examples = []
  for conversation in read_conversations(path, data_dir, what=what):
    turns = conversation.turns
    if len(turns) < 2:
      counts["no_assistant"] += 1
      continue
    if len(turns) % 2:
      # Nothing answers the last user turn, so it cannot teach anything.
      turns = turns[:-1]
      counts["odd"] += 1
    # One token past the limit tells whether trimming happened.
    ids, mask = tokenizer.encode_conversation(turns, max_length + 1, train_on_prompt)
    if len(ids) > max_length:
      ids, mask = ids[:max_length], mask[:max_length]
      if not mask[1:].any():
        counts["trimmed_away"] += 1
        continue
      counts["trimmed"] += 1
    examples.append(Example(ids=ids, loss_mask=mask))
  _report(path, counts, max_length)
  if not examples and counts["trimmed_away"]:
    # The records are fine; the limit leaves none of their answers.
    others = (f", {counts['no_assistant']} without an assistant turn"
              if counts["no_assistant"] else "")
    raise LimaError(f"data.max_length: {max_length} tokens leave no trained token in any record "
                    f"of {what} {path} ({counts['trimmed_away']} trimmed away{others}); "
                    "raise data.max_length")
  if not examples:
    raise LimaError(f"{what}: {path} holds no usable example (each needs a user turn "
                    "and an assistant turn)")
  lengths = np.array([len(e.ids) for e in examples])
  logging.info("%s: %d examples, %.0f tokens on average, %d at most",
               path, len(examples), lengths.mean(), lengths.max())
  return examples


def _report(path: str, counts: collections.Counter, max_length: int) -> None:
  for key, note in _NOTES.items():
    n = counts[key]
    if n:
      one = n == 1
      words = {"its": "its" if one else "their", "were": "was" if one else "were",
               "max_length": max_length}
      noun = "record" if one else "records"
      logging.warning("%s: %d %s %s", path, n, noun, note.format(**words))
