"""The config schema: every key the trainer reads, with LIMA's recipe as the defaults.

Config files in `configs/` start from `base_config()` and change what their setup needs;
`--config.a.b=value` overrides any field from the command line (ml_collections checks the type).
`validate()` checks the values that types cannot, naming the key.
"""

import importlib.util
import os
from importlib import resources

import ml_collections

from lima_jax import lora
from lima_jax.attention import KERNELS as ATTENTION_KERNELS
from lima_jax.errors import LimaError

REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16")
CHAT_FORMATS = ("lima", "template")  # lima_jax.data.FORMATS
ROPE_SCALING_TYPES = ("default", "linear", "llama3")  # lima_jax.model.rope_frequencies
EPOCH_STATE = ("when_idle", "always", "never")


def sample_data(name: str) -> str:
  """Path of a file of the sample set that ships with the package."""
  return str(resources.files("lima_jax") / "sample_data" / name)


def from_file(path: str) -> ml_collections.ConfigDict:
  """Loads a config file's get_config() as `--config=path` does, for programmatic use."""
  if not os.path.isfile(path):
    raise LimaError(f"--config: {path}: no such file")
  spec = importlib.util.spec_from_file_location("lima_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = ""  # the --workdir flag wins; empty means workdir/<config file name>
  c.init_from = ""  # pretrained weights: an HF LLaMA dir or a `lima_jax.convert` output dir

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""
  c.data.dev_path = ""
  c.data.tokenizer_path = ""  # a tokenizer file or model dir; "" = the one init_from carries
  c.data.eot_token = ""  # an existing special token as EOT (e.g. <|eot_id|>); "" = a new token
  c.data.chat_format = "lima"  # lima (BOS, each utterance + EOT) or template (the model's own)
  c.data.max_length = 2048  # LIMA trims texts to 2048 tokens
  c.data.train_on_prompt = False  # loss on assistant tokens (+ their EOT) only
  c.data.rows_per_step = 0  # packed rows per step; 0 = the fewest that fit every step of the run
  c.data.cache_dir = ""  # local dir for the TFDS copies; "" = <workdir>/tfds (or ~/.cache if remote)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # examples per optimizer step (LIMA: 32 for 65B, 64 for smaller)
  c.train.epochs = 15
  c.train.stop_after_steps = 0  # stop (with a checkpoint) after this step; the schedule is unchanged
  c.train.compile_cache_dir = "~/.cache/lima_jax/jax"  # compiled steps kept for reruns; "" = off
  c.train.max_bad_steps = 0  # non-finite steps skipped before the run stops (0 = stop at the first)
  # Packed rows computed at once; a step runs as many such micro-batches as its examples need and
  # sums their gradients. 0 = one row per batch shard (least padding and activation memory);
  # -1 = a step's rows all at once (no accumulation; every step gets the worst step's rows).
  c.train.micro_batch_rows = 0
  # Sequence positions whose logits the loss computes at once (recomputed in the backward pass),
  # so a step never holds a micro-batch's [rows, length, vocabulary] fp32 logits; 0 = all at once.
  c.train.loss_chunk_tokens = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-5
  c.optimizer.end_learning_rate = 1e-6
  c.optimizer.warmup_steps = 0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping (LIMA mentions none)

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 4096
  c.model.n_layers = 32
  c.model.n_heads = 32
  c.model.n_kv_heads = 32
  c.model.ffn_dim = 11008
  c.model.rope_theta = 10_000.0
  # RoPE scaling (lima_jax.model.rope_frequencies): default (none), linear, or llama3 (LLaMA-3.1's
  # factor 8, low 1, high 4, original 8192). With init_from, all of these come from the weights.
  c.model.rope_scaling_type = "default"
  c.model.rope_scaling_factor = 1.0
  c.model.rope_scaling_low_freq_factor = 1.0
  c.model.rope_scaling_high_freq_factor = 4.0
  c.model.rope_scaling_original_max_position = 8192
  c.model.norm_eps = 1e-6
  c.model.tie_embeddings = False
  c.model.residual_dropout_top = 0.2
  c.model.remat = "none"
  # auto: the Pallas splash kernel on TPU, cuDNN flash attention on GPU, XLA's on CPU
  c.model.attention = "auto"
  # True: the layers run as one scanned block, so compile time stays flat in depth (80 layers
  # compile like 2). False: a Python loop, faster steps (no stacked per-layer residuals to copy;
  # up to 1.13x on CPU) for a compile that grows with depth; worth it for shallow models.
  c.model.scan_layers = True
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "bfloat16"

  # Low-rank adapters (lima_jax.lora) instead of training every weight; rank 0 = off, the paper's
  # full fine-tuning. alpha / rank scales the adapters' output (PEFT's convention).
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0
  c.lora.targets = "q,k,v,o,gate,up,down"  # any of q, k, v, o, gate, up, down
  c.lora.dropout = 0.0  # on the adapters' input; LIMA's residual dropout applies either way

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1 = every remaining device
  c.mesh.tensor = 1
  c.mesh.cpu_devices = 0  # >0: pretend the CPU has this many devices (sharded runs on one host)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 1  # newest full checkpoints kept for resuming; 0 = all
  c.checkpoint.async_save = True
  # The full train state at an epoch end: when_idle = unless the previous one is still being
  # written (the steps never wait for it), always, or never (then only at the last step,
  # interval checkpoints and SIGTERM). The last step's state is always written.
  c.checkpoint.epoch_state = "when_idle"
  # Params of eval.generate_epochs, kept apart for choosing a checkpoint, in this dtype.
  c.checkpoint.export_dtype = "float32"
  # For preemptible machines: also checkpoint every N steps / M minutes (0 = off); only the
  # newest of these interval checkpoints is kept.
  c.checkpoint.every_steps = 0
  c.checkpoint.every_minutes = 0.0

  c.eval = ml_collections.ConfigDict()
  # LIMA chose its checkpoint among epochs 5-10 by reading dev generations. Epochs past
  # train.epochs never come; the params of each listed epoch are kept for selection. Epoch 0 is
  # the params a fresh run starts from (e.g. the imported model), before the first step.
  c.eval.generate_epochs = (5, 6, 7, 8, 9, 10)
  c.eval.max_new_tokens = 2048

  c.generate = ml_collections.ConfigDict()  # the paper's decoding
  c.generate.temperature = 0.7
  c.generate.top_p = 0.9
  c.generate.repetition_penalty = 1.2  # CTRL-style, over the tokens generated so far
  # Also penalise the prompt's tokens (transformers' reading); the paper penalises "previously
  # generated tokens" only, and on an instruct model the prompt penalty pushes answers off topic.
  c.generate.penalize_prompt = False
  c.generate.max_tokens = 2048  # new tokens at most; prompt + answer also stay within max_length
  c.generate.greedy = False
  c.generate.seed = 0
  c.generate.batch_size = 16  # prompts per batch, rounded up to the mesh's batch shards
  return c


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise LimaError(f"config {key}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Value checks the type system cannot do; each error names its key."""
  _require(c.seed >= 0, "seed", f"must be >= 0, got {c.seed}")
  _require(bool(c.data.train_path), "data.train_path", "is empty; set it to a file path")
  _require(bool(c.data.tokenizer_path or c.init_from), "data.tokenizer_path",
           "is empty; set it to a tokenizer file or directory (or set init_from)")
  _require(c.data.chat_format in CHAT_FORMATS, "data.chat_format",
           f"must be one of {CHAT_FORMATS}, got {c.data.chat_format!r}")
  _require(c.data.max_length >= 2, "data.max_length", f"must be at least 2, got {c.data.max_length}")
  _require(c.data.rows_per_step >= 0, "data.rows_per_step", "must be >= 0 (0 = automatic)")
  _require(c.train.batch_size > 0, "train.batch_size", f"must be positive, got {c.train.batch_size}")
  _require(c.train.epochs > 0, "train.epochs", f"must be positive, got {c.train.epochs}")
  _require(c.train.stop_after_steps >= 0, "train.stop_after_steps", "must be >= 0")
  _require(c.optimizer.learning_rate > 0, "optimizer.learning_rate", "must be positive")
  _require(c.optimizer.end_learning_rate >= 0, "optimizer.end_learning_rate", "must be >= 0")
  _require(c.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
  for key in ("b1", "b2"):
    _require(0 <= c.optimizer[key] < 1, f"optimizer.{key}", "must be in [0, 1)")
  _require(c.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  m = c.model
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
    _require(m[key] > 0, f"model.{key}", f"must be positive, got {m[key]}")
  _require(m.d_model % m.n_heads == 0, "model.n_heads",
           f"{m.n_heads} does not divide model.d_model={m.d_model}")
  _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
           "the head dimension d_model / n_heads must be even for rotary embeddings")
  _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
           f"{m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
  _require(m.rope_scaling_type in ROPE_SCALING_TYPES, "model.rope_scaling_type",
           f"must be one of {ROPE_SCALING_TYPES}, got {m.rope_scaling_type!r}")
  _require(m.rope_scaling_factor >= 1, "model.rope_scaling_factor",
           f"must be >= 1, got {m.rope_scaling_factor}")
  _require(0 < m.rope_scaling_low_freq_factor < m.rope_scaling_high_freq_factor,
           "model.rope_scaling_low_freq_factor",
           "must be positive and below model.rope_scaling_high_freq_factor")
  _require(m.rope_scaling_original_max_position > 0, "model.rope_scaling_original_max_position",
           "must be positive")
  _require(0 <= m.residual_dropout_top < 1, "model.residual_dropout_top", "must be in [0, 1)")
  _require(m.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}")
  _require(m.attention in ATTENTION_KERNELS, "model.attention",
           f"must be one of {ATTENTION_KERNELS}, got {m.attention!r}")
  for key in ("param_dtype", "compute_dtype"):
    _require(m[key] in DTYPES, f"model.{key}", f"must be one of {DTYPES}, got {m[key]!r}")
  _require(c.lora.rank >= 0, "lora.rank", f"must be >= 0 (0 = off), got {c.lora.rank}")
  _require(c.lora.alpha > 0, "lora.alpha", f"must be positive, got {c.lora.alpha}")
  _require(0 <= c.lora.dropout < 1, "lora.dropout", f"must be in [0, 1), got {c.lora.dropout}")
  lora.parse_targets(c.lora.targets)
  _require(c.mesh.cpu_devices >= 0, "mesh.cpu_devices", "must be >= 0")
  _require(c.checkpoint.max_to_keep >= 0, "checkpoint.max_to_keep", "must be >= 0 (0 = all)")
  _require(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = off)")
  _require(c.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0 (0 = off)")
  _require(c.checkpoint.epoch_state in EPOCH_STATE, "checkpoint.epoch_state",
           f"must be one of {EPOCH_STATE}, got {c.checkpoint.epoch_state!r}")
  _require(c.checkpoint.export_dtype in DTYPES, "checkpoint.export_dtype",
           f"must be one of {DTYPES}, got {c.checkpoint.export_dtype!r}")
  _require(c.train.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0")
  _require(c.train.loss_chunk_tokens >= 0, "train.loss_chunk_tokens",
           "must be >= 0 (0 = the whole sequence at once)")
  _require(c.train.micro_batch_rows >= -1, "train.micro_batch_rows",
           "must be a row count, 0 (one row per batch shard) or -1 (a step at once)")
  epochs = tuple(c.eval.generate_epochs)
  _require(all(isinstance(e, int) and e >= 0 for e in epochs), "eval.generate_epochs",
           f"must list epoch numbers >= 0 (0 = before training), got {epochs}")
  _require(c.eval.max_new_tokens > 0, "eval.max_new_tokens", "must be positive")
  for key, message in generate_problems(c.generate):
    raise LimaError(f"config generate.{key}: {message}")


def generate_problems(g) -> list[tuple[str, str]]:
  """(key, message) for each bad decoding setting; the generate CLI names its flags instead."""
  checks = [("temperature", g.temperature > 0, "must be positive (generate.greedy for arg max)"),
            ("top_p", 0 < g.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", g.repetition_penalty > 0, "must be positive (1.0 = none)"),
            ("max_tokens", g.max_tokens > 0, "must be positive"),
            ("seed", g.seed >= 0, "must be >= 0"),
            ("batch_size", g.batch_size > 0, "must be positive")]
  return [(key, message) for key, ok, message in checks if not ok]
