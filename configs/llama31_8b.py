"""LIMA's recipe on LLaMA-3.1-8B: llama3_8b.py (lima_7b.py's batch of 64 examples, residual
dropout rising to 0.2 at the top layer, texts trimmed at 2,048 tokens; LLaMA-3-8B's dimensions)
with LLaMA-3.1's RoPE scaling: rope_type llama3, factor 8, low- and high-frequency factors 1 and
4, original context 8,192 (Meta's LLaMA-3.1 reference model and the HF config.json).

With `--config.init_from` all of these come from the weights' config.json or params.json; the
values here serve the planner and runs from random weights.

Intended slice: v5p-8 (4 chips), remat save_dots, as llama3_8b.py (the scaling changes no
shape: `python -m lima_jax.plan --config=configs/llama31_8b.py --topology=v5p-8
--vocab_size=128257` gives its 58.6 GiB per chip of 95).
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b.py"))

  # LLaMA-3.1's RoPE scaling
  c.model.rope_scaling_type = "llama3"
  c.model.rope_scaling_factor = 8.0
  c.model.rope_scaling_low_freq_factor = 1.0
  c.model.rope_scaling_high_freq_factor = 4.0
  c.model.rope_scaling_original_max_position = 8192
  return c
