"""The embedded default: a tiny LLaMA trained from scratch on the shipped sample set.

Runs on a CPU in a few minutes on 8 fake devices, sharded over all three mesh axes, so the
same code path as a pod run (sharded init, packing, sharded step, checkpoints) is exercised.
Being random-init, it needs a far larger learning rate than LIMA's fine-tuning recipe.
"""

from lima_jax.config import base_config, sample_data


def get_config():
  c = base_config()
  c.data.train_path = sample_data("train.jsonl")
  c.data.dev_path = sample_data("dev.jsonl")
  c.data.tokenizer_path = sample_data("tokenizer.model")
  c.data.max_length = 256

  c.train.batch_size = 4
  c.train.epochs = 45

  c.optimizer.learning_rate = 1e-2
  c.optimizer.end_learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.1

  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.ffn_dim = 352
  c.model.residual_dropout_top = 0.1
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"

  c.mesh.data = 2
  c.mesh.fsdp = 2
  c.mesh.tensor = 2
  c.mesh.cpu_devices = 8

  c.eval.generate_epochs = tuple(range(1, c.train.epochs + 1))  # every epoch
  c.eval.max_new_tokens = 48
  return c
