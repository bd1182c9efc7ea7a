"""Packing efficiency: the share of computed positions that hold a real token.

Lengths follow a seeded log-normal shaped like LIMA's training set (mean about 750 tokens, a long
tail, trimmed at 2048). The run is the paper's: 1,000 examples, 32 per step, 15 epochs, each
epoch a fresh permutation. An example of n tokens fills n - 1 positions (inputs t[:-1]).

- packed: our trainer's layout (`lima_jax.train.step_layout`, the default
  train.micro_batch_rows: one row per batch shard, here one shard); each step is packed as
  training packs it and computes the micro-batches that hold tokens;
- packed_by_micro_batch_rows: the same with micro-batches of 1, 2, 4, ... rows (a slice with
  that many batch shards computes at least that many rows at once);
- packed_whole_step: train.micro_batch_rows=-1, every step computing the worst step's rows;
- pad_to_max_length: each example alone in a row of max_length (2048) positions;
- pad_to_batch_max: each example alone in a row as long as the step's longest (a shape that
  changes every step, so a recompile per new length on an XLA device).
"""

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
                 micro_batch_rows=(1, 2, 4, 8, 16)) -> dict:
  """Real-token share of computed positions for each layout, over the whole run."""
  import jax  # pylint: disable=import-outside-toplevel
  from lima_jax import config, data, sharding  # pylint: disable=import-outside-toplevel
  from lima_jax.train import step_layout, step_token_counts  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  cfg = config.base_config()
  cfg.data.max_length, cfg.train.batch_size, cfg.train.epochs = max_length, batch_size, epochs
  examples = [data.Example(ids=np.zeros(n, np.int32), loss_mask=np.ones(n, np.float32))
              for n in lengths]
  plan = data.EpochPlan(len(examples), batch_size, cfg.seed)
  total_steps = plan.steps_per_epoch * epochs
  counts = step_token_counts(examples, plan, range(total_steps))
  steps = [[examples[i] for i in plan.example_ids(step)] for step in range(total_steps)]
  positions = np.asarray(lengths) - 1
  real = positions.sum() * epochs

  done = {}  # layout -> positions: micro_batch_rows 0 and 1 are the same layout on one shard

  def computed(micro_rows: int) -> tuple[int, data.StepLayout]:
    """Positions the train step computes over the run: its micro-batches that hold tokens."""
    cfg.train.micro_batch_rows = micro_rows
    layout = step_layout(cfg, counts, mesh)
    if layout not in done:
      used = sum(int(layout.pack(step)["segment_ids"].any(axis=(1, 2)).sum()) for step in steps)
      done[layout] = used * layout.rows * max_length
    return done[layout], layout

  packed, layout = computed(0)
  whole, whole_layout = computed(-1)
  batch_max = sum(len(ids) * positions[ids].max() for ids in map(plan.example_ids,
                                                                  range(total_steps)))
  return {"packed": float(real / packed),
          "packed_by_micro_batch_rows": {str(m): float(real / computed(m)[0])
                                         for m in micro_batch_rows},
          "packed_whole_step": float(real / whole),
          "pad_to_max_length": float(real / (len(lengths) * epochs * max_length)),
          "pad_to_batch_max": float(real / batch_max),
          "mean_rows_needed": float(np.mean([data.rows_needed([c], max_length) for c in counts])),
          "micro_batch_rows": layout.rows, "micro_batches_per_step": layout.micro_batches,
          "rows_per_step_whole": whole_layout.rows, "steps": int(total_steps),
          "mean_tokens": float(np.mean(lengths)), "median_tokens": float(np.median(lengths)),
          "max_tokens": int(np.max(lengths))}
