"""The epoch plan: which examples each optimizer step sees.

As in the paper, a step is a count of examples, not tokens, and every example is seen once per
epoch. The order is a pure function of (seed, step), so a resumed run needs only its step number.
"""

import math

import numpy as np


class EpochPlan:
  """Fresh permutation per epoch; step -> example indices (the epoch's last step may be partial)."""

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if num_examples < 1:
      raise ValueError(f"num_examples must be positive, got {num_examples}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = math.ceil(num_examples / batch_size)
    # Steps come in order, so one cached permutation saves nearly all the work.
    self._cached = (None, None)

  def epoch_of(self, step: int) -> int:
    """0-based epoch of a global step."""
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    return step // self.steps_per_epoch

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples."""
    cached_epoch, order = self._cached
    if cached_epoch != epoch:
      order = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
      self._cached = (epoch, order)
    return order

  def example_ids(self, step: int) -> np.ndarray:
    """Indices of the examples of a global step, at most batch_size of them."""
    order = self.permutation(self.epoch_of(step))
    start = (step % self.steps_per_epoch) * self.batch_size
    return order[start:start + self.batch_size].copy()
