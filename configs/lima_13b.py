"""LIMA's recipe on LLaMA-13B: lima_7b.py's settings for models smaller than 65B (batch 64
examples, residual dropout rising to 0.2 at the top layer) with LLaMA-13B's dimensions.

Intended slice: v5p-16 (8 chips), the state sharded over every chip (fsdp), the matmul outputs
kept for the backward pass and the rest recomputed (remat save_dots: 53 GiB per chip of 95 in
`lima_jax.plan`, full 39). Check another slice first with
`python -m lima_jax.plan --config=configs/lima_13b.py --topology=...`.
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lima_7b.py"))

  # LLaMA-13B
  c.model.d_model = 5120
  c.model.n_layers = 40
  c.model.n_heads = 40
  c.model.n_kv_heads = 40
  c.model.ffn_dim = 13824
  c.model.remat = "save_dots"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
