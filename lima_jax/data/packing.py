"""Packing a step's examples into rows of a fixed layout, so shapes stay static all run.

An example of n tokens feeds t[:-1] to the model and predicts t[1:], so it takes n - 1
positions. Examples go into rows first-fit decreasing; each keeps its own segment id and
positions, and the model's segment mask stops attention across examples.

A step's rows are grouped into micro-batches of equal size (`StepLayout`): the train step
computes only the micro-batches that hold tokens and sums their gradients, so a short step costs
less than the longest one while every shape stays the same.
"""

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from lima_jax.data.chat_format import Example
from lima_jax.errors import LimaError


def assign_rows(token_counts: Sequence[int], length: int) -> tuple[np.ndarray, int]:
  """First-fit decreasing: the row of each example, in a row count opened as needed.

  Examples that take no position (a lone token) get row -1. Ties keep the given order,
  so the assignment is deterministic.
  """
  sizes = np.asarray(token_counts, np.int64) - 1
  rows = np.full(len(sizes), -1, np.int64)
  if len(sizes) and sizes.max() > length:
    n = int(sizes.max()) + 1
    raise LimaError(f"an example of {n} tokens needs {n - 1} positions, more than a row's "
                    f"{length}; lower data.max_length or lengthen the rows")
  free = np.empty(len(sizes), np.int64)  # never more rows than examples
  opened = 0
  for i in np.argsort(-sizes, kind="stable"):
    size = sizes[i]
    if size <= 0:
      continue
    fits = np.flatnonzero(free[:opened] >= size)
    if fits.size:
      row = fits[0]
    else:
      row, opened = opened, opened + 1
      free[row] = length
    free[row] -= size
    rows[i] = row
  return rows, opened


def rows_needed(lengths_per_step: Iterable[Sequence[int]], length: int) -> int:
  """Most rows any step needs; lengths are token counts (len(example.ids)) per step."""
  return max((assign_rows(counts, length)[1] for counts in lengths_per_step), default=0)


def pack_step(examples: Sequence[Example], rows: int, length: int) -> dict[str, np.ndarray]:
  """Arrays of shape [rows, length]: tokens, targets, weights, segment_ids, positions.

  Padding has segment 0 and weight 0.
  """
  row_of, used = assign_rows([len(e.ids) for e in examples], length)
  if used > rows:
    raise LimaError(f"data.rows_per_step: this step's {len(examples)} examples need {used} "
                    f"rows of {length} positions, only {rows} are set")
  batch = {
      "tokens": np.zeros((rows, length), np.int32),
      "targets": np.zeros((rows, length), np.int32),
      "weights": np.zeros((rows, length), np.float32),
      "segment_ids": np.zeros((rows, length), np.int32),
      "positions": np.zeros((rows, length), np.int32),
  }
  offset = np.zeros(rows, np.int64)
  segment = np.zeros(rows, np.int32)
  # Fill rows in placement order (longest first), matching the assignment above.
  order = np.argsort(-np.array([len(e.ids) for e in examples], np.int64), kind="stable")
  for i in order:
    row = row_of[i]
    if row < 0:
      continue
    ids, mask = examples[i].ids, examples[i].loss_mask
    start, end = offset[row], offset[row] + len(ids) - 1
    segment[row] += 1
    batch["tokens"][row, start:end] = ids[:-1]
    batch["targets"][row, start:end] = ids[1:]
    batch["weights"][row, start:end] = mask[1:]
    batch["segment_ids"][row, start:end] = segment[row]
    batch["positions"][row, start:end] = np.arange(end - start)
    offset[row] = end
  return batch


@dataclasses.dataclass(frozen=True)
class StepLayout:
  """A step's batch shape: `micro_batches` groups of `rows` rows of `length` positions."""
  micro_batches: int
  rows: int
  length: int

  @classmethod
  def holding(cls, rows_per_step: int, micro_rows: int, length: int) -> "StepLayout":
    """The layout that holds `rows_per_step` rows in micro-batches of `micro_rows` rows."""
    return cls(max(1, math.ceil(rows_per_step / micro_rows)), micro_rows, length)

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.micro_batches, self.rows, self.length)

  def pack(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """pack_step's arrays as [micro_batches, rows, length]. Rows fill in order, so the
    micro-batches that hold tokens come first and the rest are all padding."""
    batch = pack_step(examples, self.micro_batches * self.rows, self.length)
    return {k: v.reshape(self.shape) for k, v in batch.items()}
