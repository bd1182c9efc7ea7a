"""LIMA's recipe on LLaMA-7B: as for 65B, with the paper's settings for smaller models
(batch 64 examples, residual dropout rising to 0.2 at the top layer)."""

from lima_jax.config import base_config


def get_config():
  c = base_config()
  c.data.max_length = 2048

  c.train.batch_size = 64
  c.train.epochs = 15

  c.optimizer.learning_rate = 1e-5
  c.optimizer.end_learning_rate = 1e-6
  c.optimizer.warmup_steps = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1

  # LLaMA-7B
  c.model.d_model = 4096
  c.model.n_layers = 32
  c.model.n_heads = 32
  c.model.n_kv_heads = 32
  c.model.ffn_dim = 11008
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6
  c.model.residual_dropout_top = 0.2
  # Intended slice v5p-8: `python -m lima_jax.plan` puts save_dots at 47 GiB per chip (of 95;
  # full 37, none 101 with micro-batches of one row per chip). save_dots keeps the matmul outputs,
  # so the backward recomputes no matmul (full would add about a third of the step's FLOPs).
  c.model.remat = "save_dots"
  c.model.compute_dtype = "bfloat16"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  # The paper read the dev generations of epochs 5-10 to choose the checkpoint.
  c.eval.generate_epochs = (5, 6, 7, 8, 9, 10)
  return c
