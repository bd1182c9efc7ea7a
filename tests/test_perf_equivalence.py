"""Each speed-up gives the same loss and gradients as the code it replaced, within fp32 noise.

Block-causal attention (lima_jax.attention.causal_attention) against one
jax.nn.dot_product_attention over the whole segment-causal mask; the unrolled layer loop
(model.scan_layers=False) against the scanned stack, through the Trainer's sharded step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lima_jax import attention, optim, sharding
from lima_jax.config import base_config
from lima_jax.attention import causal_attention, segment_causal_mask
from lima_jax.model import Llama, LlamaConfig
from lima_jax.train_state import Trainer, token_loss


def _full_attention(q, k, v, mask, block=None):
  del block
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _packed_segments(rows, length):
  """Rows of two or three packed examples and trailing padding (segment 0)."""
  cuts = [(length // 3, length // 2, length - 5), (length // 4, length - 9, length - 9)]
  segments = np.zeros((rows, length), np.int32)
  for r in range(rows):
    a, b, c = cuts[r % 2]
    segments[r, :a], segments[r, a:b], segments[r, b:c] = 1, 2, 3
  return jnp.asarray(segments)


@pytest.mark.parametrize("length,block,kv_heads", [(256, 64, 4), (256, 64, 2), (192, 64, 1),
                                                   (100, 64, 2)])
def test_causal_attention_matches_full_attention(length, block, kv_heads):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (3, length, 4, 16))
  k, v = (jax.random.normal(key, (3, length, kv_heads, 16)) for key in keys[1:3])
  mask = segment_causal_mask(_packed_segments(3, length))
  weights = jax.random.normal(keys[3], q.shape)

  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v, mask, block=block) * weights)

  ours = jax.jit(jax.value_and_grad(lambda *a: loss(causal_attention, *a), argnums=(0, 1, 2)))
  ref = jax.jit(jax.value_and_grad(lambda *a: loss(_full_attention, *a), argnums=(0, 1, 2)))
  (value, grads), (ref_value, ref_grads) = ours(q, k, v), ref(q, k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_train_loss_and_grads_match_full_attention(monkeypatch):
  # 256 tokens: two blocks of the model's 128, with packing, padding, GQA and dropout.
  cfg = LlamaConfig(vocab_size=301, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    ffn_dim=128, residual_dropout_top=0.3)
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Llama(cfg, nnx.Rngs(0)))
  rows, length = 2, 2 * attention.ATTENTION_BLOCK
  segments = _packed_segments(rows, length)
  tokens = jax.random.randint(jax.random.key(1), (rows, length + 1), 0, 301)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": (segments > 0).astype(jnp.float32), "segment_ids": segments,
           "positions": jnp.tile(jnp.arange(length), (rows, 1))}

  def loss_and_grads():
    def loss(p):
      total, count = token_loss(nnx.merge(graphdef, p), batch, dropout_key=jax.random.key(2))
      return total / count
    return jax.jit(jax.value_and_grad(loss))(params)

  value, grads = loss_and_grads()
  monkeypatch.setattr(attention, "causal_attention", _full_attention)
  ref_value, ref_grads = loss_and_grads()
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "save_dots"])
def test_unrolled_layers_step_like_the_scanned_stack(remat):
  cfg = LlamaConfig(vocab_size=301, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                    ffn_dim=128, residual_dropout_top=0.3, remat=remat)
  rows, length = 4, 64
  segments = _packed_segments(rows, length)
  tokens = jax.random.randint(jax.random.key(1), (rows, length + 1), 0, 301)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": (segments > 0).astype(jnp.float32), "segment_ids": segments,
           "positions": jnp.tile(jnp.arange(length), (rows, 1))}
  batch = {k: np.asarray(v)[None] for k, v in batch.items()}  # one micro-batch
  tx, schedule = optim.make_optimizer(base_config().optimizer, total_steps=10)
  mesh = sharding.make_mesh(2, 2, 2)

  def step(scan_layers):
    trainer = Trainer(dataclasses.replace(cfg, scan_layers=scan_layers), tx, schedule, mesh, 0)
    state, metrics = trainer.train_step(trainer.init(0), trainer.put_batch(batch))
    return jax.device_get(state["params"]), jax.device_get(metrics)

  (params, metrics), (ref_params, ref_metrics) = step(False), step(True)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7, rtol=1e-5),
               params, ref_params)
