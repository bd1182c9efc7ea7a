"""Compile time of the train step against depth: 80 layers over 2, at a small width.

Each measurement builds a fresh Trainer (so nothing is reused from an earlier compile) and times
`train_step.lower(state, batch)` (tracing to StableHLO) and `.compile()` (XLA) on abstract
inputs; depths alternate so load drift hits both. The layers are scanned, so the program holds
one block whatever the depth.
"""

import time

import jax

from common import make_trainer, median, model_setup

WIDTH = dict(d_model=256, n_heads=4, ffn_dim=704)
ROWS, LENGTH = 4, 256


def _compile_once(n_layers: int) -> tuple[float, float]:
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  from lima_jax.train_state import BATCH_KEYS  # pylint: disable=import-outside-toplevel
  cfg, model_cfg = model_setup(n_layers=n_layers, **WIDTH)
  trainer = make_trainer(cfg, model_cfg, sharding.make_mesh(1, -1, 1))
  batch = {k: jax.ShapeDtypeStruct((1, ROWS, LENGTH), "float32" if k == "weights" else "int32",
                                   sharding=trainer.batch_sharding) for k in BATCH_KEYS}
  started = time.perf_counter()
  lowered = trainer.train_step.lower(trainer.abstract_state, batch)
  lowered_at = time.perf_counter()
  lowered.compile()
  return lowered_at - started, time.perf_counter() - lowered_at


def measure(repeats: int, depths=(2, 80)) -> dict:
  _compile_once(depths[0])  # warm JAX's own first-use costs out of the first timing
  times = {d: [] for d in depths}
  for _ in range(repeats):
    for depth in depths:
      times[depth].append(_compile_once(depth))
  out = {}
  for depth, pairs in times.items():
    out[f"lower_s_{depth}"] = median(p[0] for p in pairs)
    out[f"compile_s_{depth}"] = median(p[1] for p in pairs)
    out[f"total_s_{depth}"] = median(sum(p) for p in pairs)
  a, b = depths
  out["ratio"] = out[f"total_s_{b}"] / out[f"total_s_{a}"]
  out["compile_only_ratio"] = out[f"compile_s_{b}"] / out[f"compile_s_{a}"]
  return out
