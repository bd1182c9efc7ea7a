"""Causal attention within each packed example, by the kernel that suits the platform.

`model.attention` picks the kernel: 'xla' (any platform, and what CPU uses), 'splash' (the Pallas
splash-attention kernel, TPU), 'cudnn' (cuDNN flash attention, GPU), or 'auto' for the platform's
own. `resolve` turns the request into a kernel when the model is built, so a kernel the platform
cannot run is a one-line LimaError there rather than an XLA traceback at the first step.
`attender` then gives the model `attend(q, k, v)` for one forward pass.

Every kernel computes the same thing: q [B, T, N, H] attends to k, v [B, T, K, H] (K divides N;
query head h reads kv head h // (N / K), as in HF's repeat_kv) with scale 1/sqrt(H), and token t
sees token s when s <= t and both carry the same segment id (0 = padding, which sees padding).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from lima_jax import sharding
from lima_jax.errors import LimaError

# Tests only: the splash path run by the Pallas interpreter, so CPU checks the very code TPU runs
# (layout, scaling, GQA, segment ids, shard_map). config.validate does not accept it.
INTERPRETED_SPLASH = "splash_interpret"

# model.attention's values; defined here, beside the kernels, so the model imports no config code
# (ml_collections), as on machines that only run the model.
KERNELS = ("auto", "xla", "splash", "cudnn")
_AUTO = {"tpu": "splash", "gpu": "cudnn"}  # any other platform: xla
_NEEDS = {"splash": ("tpu", "the Pallas splash kernel"), "cudnn": ("gpu", "cuDNN flash attention")}


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the devices the mesh is made of (jax.devices())."""
  return jax.devices()[0].platform


def resolve(requested: str, platform_name: str, compute_dtype: str) -> str:
  """The kernel `model.attention=requested` runs on `platform_name`; LimaError if it cannot."""
  if requested == INTERPRETED_SPLASH:
    return requested
  if requested not in KERNELS:
    raise LimaError(f"model.attention={requested!r}: must be one of {KERNELS}")
  if requested == "auto":
    kernel = _AUTO.get(platform_name, "xla")
    # cuDNN's flash attention has bf16/fp16 kernels only: fp32 compute keeps XLA's.
    return "xla" if kernel == "cudnn" and compute_dtype == "float32" else kernel
  if requested in _NEEDS and _NEEDS[requested][0] != platform_name:
    needs, what = _NEEDS[requested]
    raise LimaError(f"model.attention={requested!r}: {what} runs on {needs.upper()} only, but this "
                    f"platform is {platform_name}; use 'auto' or 'xla'")
  if requested == "cudnn" and compute_dtype == "float32":
    raise LimaError("model.attention='cudnn': cuDNN flash attention has no float32 kernel; set "
                    "model.compute_dtype=bfloat16, or use 'auto' or 'xla'")
  return requested


def attender(kernel: str, segment_ids, mesh=None):
  """attend(q, k, v) -> [B, T, N, H] for one forward pass over rows with these `segment_ids`.

  `kernel` is what `resolve` returned; `mesh` is the one the activations live on (None: one
  device), needed by the splash kernel, which XLA cannot partition by itself.
  """
  if kernel == "xla":
    mask = segment_causal_mask(segment_ids)  # built once, shared by every layer
    return lambda q, k, v: causal_attention(q, k, v, mask)
  if kernel == "cudnn":
    mask = segment_causal_mask(segment_ids)
    return lambda q, k, v: cudnn_attention(q, k, v, mask)
  return functools.partial(splash_attention, segment_ids=segment_ids, mesh=mesh,
                           interpret=kernel == INTERPRETED_SPLASH)


# XLA: any platform.

def segment_causal_mask(segment_ids):
  """[B, 1, T, T] mask: a token sees earlier tokens of its own packed example only."""
  length = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same_segment & causal)[:, None, :, :]


ATTENTION_BLOCK = 128


def causal_attention(q, k, v, mask, block: int = ATTENTION_BLOCK):
  """dot_product_attention under a causal `mask` (segment_causal_mask), by query blocks.

  Query block i sees no key past its own end, so it attends to keys [0, (i+1) * block) only:
  the blocks above the diagonal are never computed. At 512 tokens that is 10 of 16 blocks; on
  CPU the layer's attention (forward + backward) takes half the time, with the same result.
  """
  length = q.shape[1]
  if length <= block or length % block:
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  return jnp.concatenate([
      jax.nn.dot_product_attention(q[:, start:start + block], k[:, :start + block],
                                   v[:, :start + block],
                                   mask=mask[:, :, start:start + block, :start + block])
      for start in range(0, length, block)], axis=1)


# cuDNN: GPU.

def cudnn_attention(q, k, v, mask):
  """cuDNN flash attention under the segment-causal `mask`.

  jax.nn.dot_product_attention's cuDNN path takes no segment ids: query_seq_lengths only cut
  one padded tail per row, and cuDNN's packed layout (q_offsets) is private to jax and Hopper-only.
  So the segments go in as the boolean mask, which jax adds to the logits as a large negative
  bias (correct, at the cost of reading a [B, 1, T, T] bias), and is_causal=True still lets
  cuDNN skip the blocks above the diagonal. cuDNN's custom partitioning splits batch and heads
  under the caller's sharding, so no shard_map is needed.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                      implementation="cudnn")


# Splash: TPU (or the Pallas interpreter, in tests).

SPLASH_LANES = 128  # splash's kv blocks are multiples of the TPU's 128 lanes
_SPLASH_BLOCKS = (512, 256, 128)


def splash_attention(q, k, v, *, segment_ids, mesh=None, block: int | None = None,
                     interpret: bool = False):
  """The splash kernel on [B, T, N, H] activations, one shard_map'd call per device.

  A Pallas kernel is opaque to XLA's partitioner, so under a mesh it runs in shard_map: rows split
  as 'batch' and heads as 'heads' / 'kv_heads' (sharding.LOGICAL_RULES), the whole length on
  every device. T is padded to a multiple of 128 with padding tokens, which no earlier token sees.
  block: the kernel's tile (default: the largest of 512, 256, 128 dividing the padded length).
  """
  length = q.shape[1]
  segment_ids = segment_ids.astype(jnp.int32)  # the kernel's id type
  padded = -(-length // SPLASH_LANES) * SPLASH_LANES
  if padded != length:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
    q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
  block = block or next(b for b in _SPLASH_BLOCKS if padded % b == 0)
  run = functools.partial(_splash_local, block=block, interpret=interpret)
  if mesh is not None:
    heads = sharding.spec_of(("batch", "length", "heads", "head_dim"))
    kv_heads = sharding.spec_of(("batch", "length", "kv_heads", "head_dim"))
    # check_vma=False: splash's pallas_calls do not declare how their outputs vary over the
    # mesh axes, which check_vma requires.
    run = jax.shard_map(run, mesh=mesh, out_specs=heads,
                        in_specs=(heads, kv_heads, kv_heads,
                                  sharding.spec_of(("batch", "length"))),
                        check_vma=False)
  return run(q, k, v, segment_ids)[:, :length]


def _splash_local(q, k, v, segment_ids, *, block: int, interpret: bool):
  """Splash on one device's rows and heads: q [b, T, n, H], k / v [b, T, kv, H]."""
  _, length, heads, head_dim = q.shape
  blocks = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  # The segment ids do the packing; the static mask is plain causal, which also lets splash
  # skip the blocks above the diagonal. The MHA kernel serves GQA: it takes kv heads that
  # divide the query heads.
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([splash.CausalMask((length, length))] * heads),
      block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
  # Splash does not scale the logits: fold 1/sqrt(H) into q. Its layout is [heads, T, H].
  to_kernel = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(kernel)(to_kernel(q * head_dim ** -0.5), to_kernel(k), to_kernel(v),
                         splash.SegmentIds(q=segment_ids, kv=segment_ids))
  return jnp.swapaxes(out, 1, 2)
