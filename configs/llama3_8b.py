"""LIMA's recipe on LLaMA-3-8B: lima_7b.py (batch 64 examples, residual dropout rising to 0.2 at
the top layer, texts trimmed at 2,048 tokens) with LLaMA-3-8B's dimensions: grouped-query
attention with 8 KV heads, FFN 14,336, RoPE theta 500,000 (no scaling), RMSNorm epsilon 1e-5,
untied LM head.

With `--config.init_from` the shape comes from the weights' config.json or params.json; the
values here serve the planner and runs from random weights. The vocabulary comes from the
tokenizer, as for every config (128,256 tokens + EOT for LLaMA-3). Without one, tell the planner:
`python -m lima_jax.plan --config=configs/llama3_8b.py --topology=v5p-8 --vocab_size=128257`.

Intended slice: v5p-8 (4 chips), the state sharded over every chip (fsdp), remat save_dots as in
lima_7b.py: 58.6 GiB per chip of 95 in `lima_jax.plan` (full 48.8, none 105.3, with
micro-batches of one 2,048-token row per chip). `train.loss_chunk_tokens=512` takes 1 GiB off
that (57.6; each chip's logits of one row are 1 GiB) for a recomputed LM head, about 2% more
FLOPs: not needed at LIMA's row length, so it stays off.
"""

import os

from lima_jax.config import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lima_7b.py"))

  # LLaMA-3-8B
  c.model.d_model = 4096
  c.model.n_layers = 32
  c.model.n_heads = 32
  c.model.n_kv_heads = 8
  c.model.ffn_dim = 14336
  c.model.rope_theta = 500_000.0
  c.model.rope_scaling_type = "default"
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = False
  c.model.remat = "save_dots"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
