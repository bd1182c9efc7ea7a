"""Packing efficiency: the share of computed positions that hold a real token.

Lengths follow a seeded log-normal shaped like LIMA's training set (mean about 750 tokens, a long
tail, trimmed at 2048). The run is the paper's: 1,000 examples, 32 per step, 15 epochs, each
epoch a fresh permutation. An example of n tokens fills n - 1 positions (inputs t[:-1]).

- packed: our trainer's layout, the same static row count it uses (`lima_jax.train.packed_rows`)
  for every step, rows of max_length;
- pad_to_max_length: each example alone in a row of max_length (2048) positions;
- pad_to_batch_max: each example alone in a row as long as the step's longest (a shape that
  changes every step, so a recompile per new length on an XLA device).
"""

import types

import numpy as np

MAX_LENGTH = 2048


def lima_lengths(count: int = 1000, mean: float = 750.0, sigma: float = 0.9, seed: int = 0,
                 cap: int = MAX_LENGTH) -> np.ndarray:
  """Token counts, log-normal with the median chosen so the mean after trimming is `mean`."""
  z = np.random.default_rng(seed).standard_normal(count)
  lo, hi = 0.0, np.log(cap)
  for _ in range(60):  # bisection on log(median): the trimmed mean grows with it
    mid = (lo + hi) / 2
    if np.minimum(np.exp(mid + sigma * z), cap).mean() < mean:
      lo = mid
    else:
      hi = mid
  return np.clip(np.round(np.exp(lo + sigma * z)), 2, cap).astype(np.int64)


def efficiencies(lengths, batch_size: int = 32, epochs: int = 15, max_length: int = MAX_LENGTH,
                 mesh=None) -> dict:
  """Real-token share of computed positions for the three layouts, over the whole run."""
  from lima_jax import config, data, sharding  # pylint: disable=import-outside-toplevel
  from lima_jax.data.packing import assign_rows  # pylint: disable=import-outside-toplevel
  from lima_jax.train import packed_rows  # pylint: disable=import-outside-toplevel
  if mesh is None:
    import jax  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  cfg = config.base_config()
  cfg.data.max_length, cfg.train.batch_size, cfg.train.epochs = max_length, batch_size, epochs
  # packed_rows reads only each example's token count.
  examples = [types.SimpleNamespace(ids=np.zeros(n, np.int32)) for n in lengths]
  plan = data.EpochPlan(len(examples), batch_size, cfg.seed)
  total_steps = plan.steps_per_epoch * epochs
  rows = packed_rows(cfg, examples, plan, total_steps, mesh)
  positions = np.asarray(lengths) - 1
  real = positions.sum() * epochs
  steps = [plan.example_ids(step) for step in range(total_steps)]
  batch_max = sum(len(ids) * positions[ids].max() for ids in steps)
  # What limits `packed`: rows are static at the worst step's need, and each epoch's last,
  # partial step fills few of them. The bound below is each step packed into just its rows.
  needed = [assign_rows(np.asarray(lengths)[ids], max_length)[1] for ids in steps]
  return {"packed": float(real / (total_steps * rows * max_length)),
          "pad_to_max_length": float(real / (len(lengths) * epochs * max_length)),
          "pad_to_batch_max": float(real / batch_max),
          "packed_rows_as_needed": float(real / (sum(needed) * max_length)),
          "mean_rows_needed": float(np.mean(needed)),
          "rows_per_step": int(rows), "steps": int(total_steps),
          "mean_tokens": float(np.mean(lengths)), "median_tokens": float(np.median(lengths)),
          "max_tokens": int(np.max(lengths))}
