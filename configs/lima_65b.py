"""LIMA as in the paper: LLaMA-65B fine-tuned on 1,000 examples.

Batch 32 examples, 15 epochs, AdamW (b1 0.9, b2 0.95, weight decay 0.1), LR 1e-5 decaying
linearly to 1e-6, no warmup, texts trimmed to 2048 tokens, residual dropout rising linearly from
0.0 at the bottom layer to 0.3 at the top.
"""

from lima_jax.config import base_config


def get_config():
  c = base_config()
  c.data.max_length = 2048

  c.train.batch_size = 32
  c.train.epochs = 15

  c.optimizer.learning_rate = 1e-5
  c.optimizer.end_learning_rate = 1e-6
  c.optimizer.warmup_steps = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1

  # LLaMA-65B
  c.model.d_model = 8192
  c.model.n_layers = 80
  c.model.n_heads = 64
  c.model.n_kv_heads = 64
  c.model.ffn_dim = 22016
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6
  c.model.residual_dropout_top = 0.3
  c.model.remat = "full"
  c.model.compute_dtype = "bfloat16"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # The paper read the dev generations of epochs 5-10 to choose the checkpoint.
  c.eval.generate_epochs = (5, 6, 7, 8, 9, 10)
  return c
