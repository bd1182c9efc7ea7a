"""LIMA's recipe on LLaMA-33B (released as "30B"): lima_7b.py's settings for models smaller than
65B (batch 64 examples, residual dropout rising to 0.2 at the top layer) with LLaMA-33B's
dimensions.

Intended slice: v5p-32 (16 chips), the state sharded over every chip (fsdp) and each layer
recomputed in the backward pass (remat full: 50 GiB per chip of 95 in `lima_jax.plan`; save_dots
needs 81, too close to the limit for a plan made on XLA:CPU). Check another slice first with
`python -m lima_jax.plan --config=configs/lima_33b.py --topology=...`.
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lima_7b.py"))

  # LLaMA-33B: 52 heads of 128
  c.model.d_model = 6656
  c.model.n_layers = 60
  c.model.n_heads = 52
  c.model.n_kv_heads = 52
  c.model.ffn_dim = 17920
  c.model.remat = "full"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
