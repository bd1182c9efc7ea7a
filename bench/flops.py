"""Model FLOPs of a training step, the numerator of MFU.

Per trained token: 6 * N for the weight matmuls (forward 2N, backward 4N), where N counts the
parameters that take part in a matmul: every block's projections and the LM head over the real
vocabulary. The embedding is a gather, not a matmul, and the padded vocabulary columns are
waste, so neither counts. Attention adds 12 * layers * (heads * head_dim) * seq_len per token:
QK^T and AV each take 2 * seq_len * heads * head_dim FLOPs forward, times 3 for training. As in
PaLM's MFU, the causal half is counted too (the dense kernels compute it).
"""


def matmul_params(cfg) -> int:
  """N: parameters used in matmuls (cfg is a lima_jax.model.LlamaConfig)."""
  d, hd = cfg.d_model, cfg.head_dim
  attention = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o; k, v
  mlp = 3 * d * cfg.ffn_dim  # gate, up, down
  return cfg.n_layers * (attention + mlp) + d * cfg.vocab_size


def train_flops_per_token(cfg, seq_len: int) -> int:
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
  return 6 * matmul_params(cfg) + attention


def train_flops(cfg, rows: int, seq_len: int) -> int:
  """FLOPs of one step over rows x seq_len positions (every position counts as a token)."""
  return train_flops_per_token(cfg, seq_len) * rows * seq_len
