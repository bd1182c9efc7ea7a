"""LIMA's recipe on LLaMA-2-7B: lima_7b.py (batch 64 examples, residual dropout rising to 0.2 at
the top layer) with LLaMA-2's 4,096-token context, so texts are trimmed at 4,096 tokens instead of
LIMA's 2,048, and LLaMA-2's RMSNorm epsilon. The dimensions are LLaMA-1 7B's.

Intended slice: v5p-8 (4 chips), the state sharded over every chip (fsdp), remat save_dots as in
lima_7b.py (61 GiB per chip of 95 in `lima_jax.plan` with the 4,096-token rows; full 42). Check another slice first with
`python -m lima_jax.plan --config=configs/llama2_7b.py --topology=...`.
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lima_7b.py"))
  c.data.max_length = 4096
  c.model.norm_eps = 1e-5  # LLaMA-2's (LLaMA-1 used 1e-6)

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
