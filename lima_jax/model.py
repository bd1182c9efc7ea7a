"""LLaMA in Flax NNX, with LIMA's layer-wise residual dropout.

Read top to bottom it follows the architecture: RMSNorm, rotary position embedding, grouped-query
attention restricted to each packed example, SwiGLU feed-forward, the decoder block with dropout on
each sub-layer's output before the residual add, a scanned stack of blocks (or a loop over them:
`scan_layers`), and the LM head.
`Llama.extend` is the inference path of the same stack: it reads and extends a KV cache.
With LoRA (`lora_rank` > 0) each targeted projection adds its low-rank adapter's output
(`lima_jax.lora`); the paper's recipe is the default, rank 0: no adapters.

Params carry logical axis names (`lima_jax.sharding` maps them onto the mesh); activations are
constrained by the `sharding.Constrainer` the caller passes in, so this file knows no mesh. The
attention kernel (`lima_jax.attention`) is chosen by `attention` in the config and the platform.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lima_jax import attention, lora
from lima_jax.sharding import Constrainer

NO_MESH = Constrainer()  # one device: nothing to constrain
VOCAB_MULTIPLE = 128  # the padded vocabulary keeps the embedding and LM head tile-aligned on TPU


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int  # real tokens, EOT included; the tables are padded past it
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  rope_theta: float = 10_000.0
  # RoPE scaling for contexts past the pretraining length (see rope_frequencies): default (none),
  # linear, or llama3 (LLaMA-3.1 and later). The factors are read only by the types that use them.
  rope_scaling_type: str = "default"
  rope_scaling_factor: float = 1.0
  rope_scaling_low_freq_factor: float = 1.0
  rope_scaling_high_freq_factor: float = 4.0
  rope_scaling_original_max_position: int = 8192
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  residual_dropout_top: float = 0.0  # LIMA: 0.3 for 65B, 0.2 for smaller models
  remat: str = "none"  # none | full | save_dots
  attention: str = "auto"  # auto | xla | splash | cudnn: see lima_jax.attention
  scan_layers: bool = True  # False: a Python loop over the layers (see Llama.__call__)
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  # LoRA (lima_jax.lora): rank 0 = off, every weight trains (the paper's full fine-tuning).
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = tuple(lora.TARGETS)
  lora_dropout: float = 0.0

  def __post_init__(self):  # metadata JSON gives a list; the config must stay hashable
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def residual_dropout_rates(n_layers: int, top: float) -> jnp.ndarray:
  """LIMA's schedule: 0.0 at the bottom layer rising linearly to `top` at the top layer."""
  if n_layers == 1:
    return jnp.zeros((1,), jnp.float32)
  return top * jnp.arange(n_layers, dtype=jnp.float32) / (n_layers - 1)


def _param(rngs, shape, names, dtype, init=nnx.initializers.normal(0.02)):
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("embed",))

  def __call__(self, x):
    # Normalise in fp32 whatever the compute dtype: bf16 variance underflows.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """The rotary inverse frequencies, [head_dim / 2] fp32 radians per position.

  default: theta^(-2i / head_dim) (RoFormer, as in LLaMA). linear: all of them divided by
  rope_scaling_factor (positions interpolated). llama3 (LLaMA-3.1's long context): a frequency
  whose wavelength exceeds original_max_position / low_freq_factor is divided by the factor, one
  whose wavelength is under original_max_position / high_freq_factor is kept, and those between
  are blended linearly in original_max_position / wavelength (Meta's `apply_scaling` in the
  LLaMA-3.1 reference model; transformers' `_compute_llama3_parameters`). fp32 throughout, as
  transformers computes them.
  """
  f32 = np.float32
  inv_freq = f32(1) / (f32(cfg.rope_theta) ** (np.arange(0, cfg.head_dim, 2, dtype=f32)
                                               / f32(cfg.head_dim)))
  factor = f32(cfg.rope_scaling_factor)
  if cfg.rope_scaling_type == "default":
    return inv_freq
  if cfg.rope_scaling_type == "linear":
    return inv_freq / factor
  if cfg.rope_scaling_type != "llama3":
    raise ValueError(f"rope_scaling_type {cfg.rope_scaling_type!r}: not default, linear or llama3")
  low, high = f32(cfg.rope_scaling_low_freq_factor), f32(cfg.rope_scaling_high_freq_factor)
  original = f32(cfg.rope_scaling_original_max_position)
  wavelength = f32(2 * math.pi) / inv_freq
  smooth = (original / wavelength - low) / (high - low)
  blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return np.where(wavelength < original / high, inv_freq,
                  np.where(wavelength > original / low, inv_freq / factor, blended)).astype(f32)


def apply_rope(x, positions, inv_freq: np.ndarray):
  """Rotary embedding in the rotate-half layout used by HF transformers.

  x: [batch, length, heads, head_dim]; positions: [batch, length], restarting at 0 for every
  packed example so each one sees the positions it would see alone; inv_freq: [head_dim / 2]
  from `rope_frequencies`.
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads (n_kv_heads == n_heads is plain MHA)."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, h, kv, hd, dt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    self.cfg = cfg
    self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dt)
    self.wk = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
    self.wv = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
    self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dt)

  def _project(self, x, positions, lora_key=None):
    dt = x.dtype
    q, k, v = (lora.adapted(self, name, x, jnp.einsum("btd,dnh->btnh", x, w[...].astype(dt)),
                            lora_key)
               for name, w in (("q", self.wq), ("k", self.wk), ("v", self.wv)))
    inv_freq = rope_frequencies(self.cfg)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

  def _output(self, out, lora_key=None):
    return lora.adapted(self, "o", out,
                        jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(out.dtype)), lora_key)

  def __call__(self, x, positions, attend, lora_key=None):
    """`attend(q, k, v)`: causal attention within each packed example (attention.attender).
    lora_key: dropout on the adapters' inputs (training); None: none."""
    q, k, v = self._project(x, positions, lora_key)
    return self._output(attend(q, k, v), lora_key)

  def cached(self, x, positions, mask, cache, layer, index):
    """Attention over a KV cache: writes this call's keys and values into layer `layer` of the
    stacked cache at slot `index`, then attends to every slot of that layer that `mask` allows.

    Only the new slots are written, so a decode step does not copy the cache. Generation stays on
    XLA's attention whatever `attention` says: the cache's mask is not segment-causal, and a
    decode step is one query per row, bound by reading the cache rather than by the kernel.
    """
    q, k, v = self._project(x, positions)
    at = (layer, 0, index, 0, 0)
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at),
             "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at)}
    out = jax.nn.dot_product_attention(q, cache["k"][layer].astype(q.dtype),
                                       cache["v"][layer].astype(q.dtype), mask=mask)
    return self._output(out), cache


class FeedForward(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    d, f, dt = cfg.d_model, cfg.ffn_dim, cfg.param_dtype
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), dt)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), dt)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), dt)

  def __call__(self, x, lora_key=None):
    # gate and up as one [d, 2, ffn] matmul, forward and backward (stacked here, stored apart, so
    # checkpoints and converters see gate/up; stacking keeps each device's 'mlp' shard local):
    # the one-device CPU step is ~1.25x faster.
    dt = x.dtype
    gate_up = jnp.stack([self.gate[...].astype(dt), self.up[...].astype(dt)], axis=1)
    hidden = jnp.einsum("btd,dkf->btkf", x, gate_up)
    gate = lora.adapted(self, "gate", x, hidden[..., 0, :], lora_key)
    up = lora.adapted(self, "up", x, hidden[..., 1, :], lora_key)
    inner = jax.nn.silu(gate) * up
    return lora.adapted(self, "down", inner, inner @ self.down[...].astype(dt), lora_key)


def residual_dropout(x, rate, key):
  """Inverted dropout with a traced rate (it differs per layer inside the scan)."""
  if key is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class DecoderBlock(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
    self.mlp = FeedForward(cfg, rngs)
    # LoRA's adapters, drawn after every base weight: the base is the same with or without them.
    lora.attach(cfg, {"attn": self.attn, "mlp": self.mlp}, rngs)

  def __call__(self, x, positions, attend, dropout_rate, dropout_key, constrain: Constrainer):
    attn_key = mlp_key = lora_key = None
    if dropout_key is not None:
      attn_key, mlp_key = jax.random.split(dropout_key)
      lora_key = jax.random.fold_in(dropout_key, 2)  # adapters' input dropout (lima_jax.lora)
    x = x + residual_dropout(self.attn(self.attn_norm(x), positions, attend, lora_key),
                             dropout_rate, attn_key)
    x = constrain(x, ("batch", "length", "act_embed"))
    x = x + residual_dropout(self.mlp(self.mlp_norm(x), lora_key), dropout_rate, mlp_key)
    return constrain(x, ("batch", "length", "act_embed"))

  def cached(self, x, positions, mask, cache, layer, index, constrain: Constrainer):
    """The block at inference (no dropout), its attention reading and extending the KV cache."""
    attn_out, cache = self.attn.cached(self.attn_norm(x), positions, mask, cache, layer, index)
    x = constrain(x + attn_out, ("batch", "length", "act_embed"))
    x = constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "length", "act_embed"))
    return x, cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _unstack_layers(stacked, n_layers: int) -> list:
  """The stacked blocks' state as one state per layer. A split (not n slices) so that the
  gradient flows back into the stack as one concatenate."""
  leaves, treedef = jax.tree.flatten(stacked)
  pieces = [jnp.split(leaf, n_layers) for leaf in leaves]
  return [treedef.unflatten([jnp.squeeze(p[i], 0) for p in pieces]) for i in range(n_layers)]


class Llama(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    # Resolved here, so a kernel this platform cannot run fails when the model is built.
    self.attention_kernel = attention.resolve(cfg.attention, attention.platform(),
                                              cfg.compute_dtype)
    self.embed = _param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)

    # One block per layer, created with a leading 'layers' axis so the stack is scanned: compile
    # time stays flat in depth (80 layers compile like 2).
    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return DecoderBlock(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"),
                            cfg.param_dtype)

  def __call__(self, tokens, positions, segment_ids, *, dropout_key=None,
               constrain: Constrainer = NO_MESH):
    """Logits [B, T, padded_vocab] in fp32; the padding columns are -inf-like.

    dropout_key=None is evaluation: no dropout anywhere. With a key, layer l drops its sub-layer
    outputs at rate residual_dropout_top * l / (L - 1), with a key folded from l.
    """
    return self.logits(self.hidden(tokens, positions, segment_ids, dropout_key=dropout_key,
                                   constrain=constrain))

  def hidden(self, tokens, positions, segment_ids, *, dropout_key=None,
             constrain: Constrainer = NO_MESH):
    """The top block's output [B, T, d_model] in the compute dtype, before the final norm:
    `logits` of any slice of it along T gives those positions' logits (the chunked loss)."""
    cfg = self.cfg
    x = self._embed(tokens, constrain)
    attend = attention.attender(self.attention_kernel, segment_ids, constrain.mesh)
    rates = residual_dropout_rates(cfg.n_layers, cfg.residual_dropout_top)
    layer_ids = jnp.arange(cfg.n_layers)
    block_def, block_state = nnx.split(self.blocks)

    def layer(x, scanned):
      state, rate, index = scanned
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
      return nnx.merge(block_def, state)(x, positions, attend, rate, key, constrain), None

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    if cfg.scan_layers:  # compile time flat in depth
      x, _ = jax.lax.scan(layer, x, (block_state, rates, layer_ids))
    else:  # no stacked residual buffers to zero, fill and copy: faster steps, compile grows
      for index, state in enumerate(_unstack_layers(block_state, cfg.n_layers)):
        x, _ = layer(x, (state, rates[index], layer_ids[index]))
    return x

  def init_cache(self, batch: int, length: int) -> dict:
    """An empty KV cache of `length` slots per row: {'k', 'v'} of [layers, B, S, kv_heads, hd]."""
    cfg = self.cfg
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}

  def extend(self, tokens, positions, cache, index, slot_valid, *,
             constrain: Constrainer = NO_MESH):
    """Runs `tokens` [B, T] at cache slots index..index+T-1 (the prefill, or one decode step).

    slot_valid [B, S] marks the slots that hold a row's tokens (False on its padding). A token
    attends to the valid slots up to its own. Returns (logits [B, T, padded_vocab], cache).
    """
    length = cache["k"].shape[2]
    x = self._embed(tokens, constrain)
    slots = jnp.arange(length)
    query_slots = index + jnp.arange(tokens.shape[1])
    mask = slot_valid[:, None, None, :] & (slots <= query_slots[:, None])[None, None]
    # A padding token sees itself, so no softmax row is empty.
    mask = mask | (slots == query_slots[:, None])[None, None]
    block_def, block_state = nnx.split(self.blocks)
    names = ("layers", "batch", "length", "kv_heads", "head_dim")

    def layer(carry, scanned):
      x, cache = carry
      state, layer_id = scanned
      x, cache = nnx.merge(block_def, state).cached(x, positions, mask, cache, layer_id, index,
                                                     constrain)
      return (x, jax.tree.map(lambda c: constrain(c, names), cache)), None

    (x, cache), _ = jax.lax.scan(layer, (x, cache), (block_state, jnp.arange(self.cfg.n_layers)))
    return self.logits(x), cache

  def _embed(self, tokens, constrain):
    # Gather the table whole along 'embed' first: XLA cannot gather from an fsdp-split table
    # into a batch-split output without replicating everything.
    table = constrain(self.embed[...].astype(self.cfg.compute_dtype), ("vocab", "act_embed"))
    return constrain(table[tokens], ("batch", "length", "act_embed"))

  def logits(self, x):
    """Final norm and LM head: x [..., d_model] -> logits [..., padded_vocab] in fp32, the
    padding columns -inf-like."""
    cfg = self.cfg
    x = self.final_norm(x)
    head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("...d,dv->...v", x, head.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32)
    is_real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    return jnp.where(is_real, logits, jnp.finfo(jnp.float32).min)
