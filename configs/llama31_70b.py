"""LIMA as in the paper, on LLaMA-3.1-70B: lima_65b.py's recipe (batch 32 examples, 15 epochs,
LR 1e-5 to 1e-6, residual dropout rising to 0.3 at the top layer, texts trimmed at 2,048 tokens)
with LLaMA-3.1-70B's dimensions (80 layers, d_model 8192, 64 heads with 8 KV heads, FFN 28,672,
RoPE theta 500,000 with LLaMA-3.1's llama3 scaling, RMSNorm epsilon 1e-5, untied LM head).

With `--config.init_from` the shape comes from the weights' config.json or params.json; the
values here serve the planner and runs from random weights. The vocabulary (128,256 + EOT)
comes from the tokenizer, or tell the planner:
`python -m lima_jax.plan --config=configs/llama31_70b.py --topology=v5p-32 --vocab_size=128257`.

Intended slice: v5p-64 (32 chips), the state sharded over every chip (fsdp) and each layer
recomputed in the backward pass (remat full): 54.0 GiB per chip of 95 in `lima_jax.plan`
(save_dots 111.4 does not fit). v5p-32 fits on paper at 86.9 GiB (91%), too close to the limit
for a plan made on XLA:CPU. `train.loss_chunk_tokens` changes nothing here (54.0 with 512-position
chunks): the step's peak is in the layers, not the loss.
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lima_65b.py"))

  # LLaMA-3.1-70B
  c.model.d_model = 8192
  c.model.n_layers = 80
  c.model.n_heads = 64
  c.model.n_kv_heads = 8
  c.model.ffn_dim = 28672
  c.model.rope_theta = 500_000.0
  c.model.rope_scaling_type = "llama3"
  c.model.rope_scaling_factor = 8.0
  c.model.rope_scaling_low_freq_factor = 1.0
  c.model.rope_scaling_high_freq_factor = 4.0
  c.model.rope_scaling_original_max_position = 8192
  c.model.norm_eps = 1e-5
  c.model.remat = "full"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
