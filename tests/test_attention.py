"""Every attention kernel computes XLA's segment-causal attention, and each runs where it can.

The splash kernel runs here through the Pallas interpreter (attention.INTERPRETED_SPLASH): the
same layout, scaling, GQA, segment ids and shard_map as on TPU. cuDNN needs a GPU; on CPU its
wrapper is checked to ask jax for exactly our mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from lima_jax import attention, sharding
from lima_jax.config import ATTENTION_KERNELS
from lima_jax.errors import LimaError
from lima_jax.model import Llama, LlamaConfig
from lima_jax.train_state import Trainer, token_loss

CFG = LlamaConfig(vocab_size=301, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


def _packed_segments(rows, length):
  """Rows of two to four packed examples, some with trailing padding (segment 0)."""
  segments = np.zeros((rows, length), np.int32)
  for r in range(rows):
    cuts = np.sort(np.random.default_rng(r).choice(np.arange(1, length), 3, replace=False))
    ends = list(cuts[:2 + r % 2]) + [length - 7 * (r % 3)]
    for segment, (start, end) in enumerate(zip([0] + ends[:-1], ends), start=1):
      segments[r, start:end] = segment
  return jnp.asarray(segments)


@pytest.mark.parametrize("platform,dtype,kernel", [
    ("tpu", "bfloat16", "splash"), ("gpu", "bfloat16", "cudnn"), ("cpu", "bfloat16", "xla"),
    ("gpu", "float32", "xla")])  # cuDNN has no fp32 flash attention
def test_auto_picks_the_platforms_kernel(platform, dtype, kernel):
  assert attention.resolve("auto", platform, dtype) == kernel


def test_a_kernel_is_kept_on_its_own_platform_and_xla_everywhere():
  assert attention.resolve("splash", "tpu", "float32") == "splash"
  assert attention.resolve("cudnn", "gpu", "bfloat16") == "cudnn"
  assert all(attention.resolve("xla", p, "float32") == "xla" for p in ("cpu", "gpu", "tpu"))
  assert attention.INTERPRETED_SPLASH not in ATTENTION_KERNELS  # never a user's value


@pytest.mark.parametrize("kernel,runs_on", [("splash", "the Pallas splash kernel runs on TPU"),
                                             ("cudnn", "cuDNN flash attention runs on GPU")])
def test_a_kernel_the_platform_cannot_run_is_refused_when_the_trainer_is_built(kernel, runs_on):
  cfg = LlamaConfig(**{**CFG.__dict__, "attention": kernel})
  with pytest.raises(LimaError) as error:
    Trainer(cfg, optax.sgd(0.1), optax.constant_schedule(0.1), sharding.make_mesh(1, -1, 1), 0)
  # One line (jax's traceback note goes to __notes__, which our entry points do not print).
  assert str(error.value) == (f"model.attention='{kernel}': {runs_on} only, but this platform "
                              "is cpu; use 'auto' or 'xla'")


def test_cudnn_in_fp32_is_refused_naming_the_dtype():
  with pytest.raises(LimaError, match=r"^model.attention='cudnn': .*model.compute_dtype"):
    attention.resolve("cudnn", "gpu", "float32")


def _qkv(rows, length, kv_heads, heads=4, head_dim=16):
  keys = jax.random.split(jax.random.key(kv_heads), 4)
  q = jax.random.normal(keys[0], (rows, length, heads, head_dim))
  k, v = (jax.random.normal(key, (rows, length, kv_heads, head_dim)) for key in keys[1:3])
  return q, k, v, jax.random.normal(keys[3], q.shape)


def _value_and_grads(attend, q, k, v, weights):
  loss = lambda q, k, v: jnp.sum(attend(q, k, v) * weights)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_same(ours, ref):
  (value, grads), (ref_value, ref_grads) = ours, ref
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads,length,block,sharded", [
    (4, 384, 128, False),  # MHA, three blocks of 128
    (2, 384, 128, True),  # GQA under shard_map: rows over data x fsdp, heads over tensor
    (1, 200, None, False)])  # MQA; 200 tokens are padded to 256 for the kernel
def test_splash_matches_xla_in_outputs_and_gradients(kv_heads, length, block, sharded):
  rows = 4
  q, k, v, weights = _qkv(rows, length, kv_heads)
  segments = _packed_segments(rows, length)
  mesh = sharding.make_mesh(2, 2, 2) if sharded else None
  if sharded:
    put = lambda x, names: jax.device_put(x, NamedSharding(mesh, sharding.spec_of(names)))
    q, weights = (put(x, ("batch", "length", "heads", "head_dim")) for x in (q, weights))
    k, v = (put(x, ("batch", "length", "kv_heads", "head_dim")) for x in (k, v))
    segments = put(segments, ("batch", "length"))
  splash = lambda q, k, v: attention.splash_attention(q, k, v, segment_ids=segments, mesh=mesh,
                                                      block=block, interpret=True)
  _assert_same(_value_and_grads(splash, q, k, v, weights),
               _value_and_grads(attention.attender("xla", segments), q, k, v, weights))


def test_cudnn_asks_jax_for_the_segment_causal_mask(monkeypatch):
  q, k, v, weights = _qkv(2, 256, 2)
  segments = _packed_segments(2, 256)
  expected = _value_and_grads(attention.attender("xla", segments), q, k, v, weights)
  # No GPU here: hand cuDNN's call to XLA's implementation, which must then give our attention.
  real = jax.nn.dot_product_attention

  def as_xla(*args, implementation=None, **kwargs):
    assert implementation == "cudnn" and kwargs["is_causal"]
    return real(*args, implementation="xla", **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  _assert_same(_value_and_grads(attention.attender("cudnn", segments), q, k, v, weights), expected)


def test_model_with_splash_gives_the_loss_and_gradients_it_gives_with_xla():
  # The wiring: Llama -> attender, with the mesh the Constrainer carries (as the Trainer passes it).
  rows, length = 4, 128
  segments = _packed_segments(rows, length)
  tokens = jax.random.randint(jax.random.key(0), (rows, length + 1), 0, 300)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
           "weights": (segments > 0).astype(jnp.float32),
           "positions": jnp.tile(jnp.arange(length), (rows, 1))}
  constrain = sharding.Constrainer(sharding.make_mesh(2, 2, 2))

  def value_and_grads(kernel):
    with nnx.use_eager_sharding(False):
      graphdef, params = nnx.split(Llama(LlamaConfig(**{**CFG.__dict__, "attention": kernel}),
                                         nnx.Rngs(0)))

    def loss(params):
      total, count = token_loss(nnx.merge(graphdef, params), batch, constrain=constrain,
                                dropout_key=jax.random.key(1))
      return total / count
    return jax.jit(jax.value_and_grad(loss))(params)

  (value, grads), (ref_value, ref_grads) = (value_and_grads(attention.INTERPRETED_SPLASH),
                                            value_and_grads("xla"))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6), grads,
               ref_grads)
