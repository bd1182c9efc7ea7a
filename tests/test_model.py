"""The model's contracts: causality, packed examples kept apart, LIMA dropout, sharded == single."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lima_jax import optim, sharding
from lima_jax.config import base_config
from lima_jax.errors import LimaError
from lima_jax.model import Llama, LlamaConfig, residual_dropout_rates
from lima_jax.train_state import Trainer

CFG = LlamaConfig(vocab_size=301, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128,
                  residual_dropout_top=0.3)


@pytest.fixture(scope="module")
def model():
  with nnx.use_eager_sharding(False):
    return Llama(CFG, nnx.Rngs(0))


def forward(model, tokens, positions, segment_ids, **kwargs):
  return jax.jit(lambda t, p, s: model(t, p, s, **kwargs))(tokens, positions, segment_ids)


def test_changing_a_later_token_never_changes_an_earlier_logit(model):
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 300)
  positions = jnp.tile(jnp.arange(24), (2, 1))
  segments = jnp.ones((2, 24), jnp.int32)
  base = forward(model, tokens, positions, segments)
  for t in (5, 13, 23):
    changed = forward(model, tokens.at[:, t].set((tokens[:, t] + 7) % 300), positions, segments)
    np.testing.assert_array_equal(base[:, :t], changed[:, :t])
    assert np.abs(base[:, t:] - changed[:, t:]).max() > 1e-4  # the change is seen from t on


def test_packed_examples_never_see_each_other(model):
  a = jax.random.randint(jax.random.key(2), (10,), 0, 300)
  b = jax.random.randint(jax.random.key(3), (14,), 0, 300)
  alone = forward(model, a[None], jnp.arange(10)[None], jnp.ones((1, 10), jnp.int32))
  # Row: b (segment 1) then a (segment 2), positions restarting at 0 for each, then padding.
  def packed(b_tokens):
    tokens = jnp.concatenate([b_tokens, a, jnp.zeros(8, jnp.int32)])[None]
    positions = jnp.concatenate([jnp.arange(14), jnp.arange(10), jnp.zeros(8, jnp.int32)])[None]
    segments = jnp.concatenate([jnp.full(14, 1), jnp.full(10, 2), jnp.zeros(8)]).astype(
        jnp.int32)[None]
    return forward(model, tokens, positions, segments)
  first = packed(b)
  other = packed((b + 11) % 300)
  np.testing.assert_allclose(first[0, 14:24], alone[0], atol=1e-5)
  np.testing.assert_array_equal(first[0, 14:24], other[0, 14:24])


def test_padded_vocabulary_logits_are_masked(model):
  logits = forward(model, jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None],
                   jnp.ones((1, 4), jnp.int32))
  assert logits.shape[-1] == 384
  assert np.all(np.asarray(logits[..., CFG.vocab_size:]) < -1e30)


def test_dropout_rates_rise_linearly_from_zero_to_the_top():
  np.testing.assert_allclose(residual_dropout_rates(80, 0.3), 0.3 * np.arange(80) / 79, rtol=1e-6)
  np.testing.assert_allclose(residual_dropout_rates(32, 0.2), 0.2 * np.arange(32) / 31, rtol=1e-6)


def test_dropout_is_applied_in_training_and_absent_in_evaluation(model):
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 300)
  positions = jnp.tile(jnp.arange(16), (2, 1))
  segments = jnp.ones((2, 16), jnp.int32)
  eval_a = forward(model, tokens, positions, segments)
  eval_b = forward(model, tokens, positions, segments)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = forward(model, tokens, positions, segments, dropout_key=jax.random.key(0))
  train_b = forward(model, tokens, positions, segments, dropout_key=jax.random.key(1))
  assert np.abs(train_a - eval_a).max() > 1e-3
  assert np.abs(train_a - train_b).max() > 1e-3
  again = forward(model, tokens, positions, segments, dropout_key=jax.random.key(0))
  np.testing.assert_array_equal(train_a, again)


def test_bottom_layer_has_no_dropout():
  # With one layer the only rate is the bottom one, 0.0: a key must change nothing.
  one = LlamaConfig(**{**CFG.__dict__, "n_layers": 1})
  with nnx.use_eager_sharding(False):
    m = Llama(one, nnx.Rngs(0))
  tokens = jnp.arange(12)[None]
  segments = jnp.ones((1, 12), jnp.int32)
  np.testing.assert_array_equal(
      forward(m, tokens, tokens, segments),
      forward(m, tokens, tokens, segments, dropout_key=jax.random.key(0)))


def _one_step(mesh, batch):
  opt_cfg = base_config().optimizer
  opt_cfg.learning_rate = 1e-3
  tx, schedule = optim.make_optimizer(opt_cfg, total_steps=10)
  trainer = Trainer(CFG, tx, schedule, mesh, seed=0)
  state = trainer.init(0)
  # One micro-batch of all rows: [1, rows, length].
  state, metrics = trainer.train_step(state, trainer.put_batch({k: v[None] for k, v in batch.items()}))
  return jax.device_get(state["params"]), jax.device_get(metrics)


def test_sharded_train_step_equals_single_device_step():
  rng = np.random.default_rng(0)
  rows, length = 8, 32
  batch = {
      "tokens": rng.integers(0, 300, (rows, length)).astype(np.int32),
      "targets": rng.integers(0, 300, (rows, length)).astype(np.int32),
      "weights": (rng.random((rows, length)) > 0.3).astype(np.float32),
      "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 12]), rows, 0).astype(np.int32),
      "positions": np.repeat(np.concatenate([np.arange(20), np.arange(12)])[None], rows, 0),
  }
  single, m1 = _one_step(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), batch)
  sharded, m8 = _one_step(sharding.make_mesh(2, 2, 2), batch)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
  # Adam's first update is about +-lr per element whatever the gradient's size, so an element
  # whose gradient is at float noise level may move differently; 5% of lr bounds that noise.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5, rtol=0), single, sharded)


def test_indivisible_dimension_is_refused_naming_the_config_key():
  bad = LlamaConfig(**{**CFG.__dict__, "ffn_dim": 129})
  tx, schedule = optim.make_optimizer(base_config().optimizer, total_steps=10)
  with pytest.raises(LimaError, match=r"^model.ffn_dim: .* is 129, not divisible by mesh axis tensor=2$"):
    Trainer(bad, tx, schedule, sharding.make_mesh(1, 4, 2), seed=0)


def test_chunked_loss_equals_the_whole_sequence_loss_through_the_train_step():
  """train.loss_chunk_tokens: the same loss and gradients (SGD at lr 1 makes the update the
  gradient) over two micro-batches, with a chunk that does not divide the length (40 = 16 + 16 +
  8 padded). The vocabulary's padding columns stay masked: their rows never move."""
  rng = np.random.default_rng(0)
  micro, rows, length = 2, 8, 40
  batch = {
      "tokens": rng.integers(0, 301, (micro, rows, length)).astype(np.int32),
      "targets": rng.integers(0, 301, (micro, rows, length)).astype(np.int32),
      "weights": (rng.random((micro, rows, length)) > 0.3).astype(np.float32),
      "segment_ids": np.repeat([[1] * 25 + [2] * 15], micro * rows, 0).reshape(micro, rows, -1),
      "positions": np.tile(np.r_[np.arange(25), np.arange(15)], (micro, rows, 1)),
  }
  results = {}
  for chunk in (0, 16):
    trainer = Trainer(CFG, optax.sgd(1.0), optax.constant_schedule(1.0),
                      sharding.make_mesh(2, 2, 2), seed=0, loss_chunk_tokens=chunk)
    before = jax.device_get(trainer.init(0)["params"])
    evaluated = jax.device_get(trainer.eval_step(trainer.init(0)["params"],
                                                 trainer.put_batch(batch)))
    state, metrics = trainer.train_step(trainer.init(0), trainer.put_batch(batch))
    grads = jax.tree.map(np.subtract, before, jax.device_get(state["params"]))
    results[chunk] = jax.device_get(metrics), grads, evaluated
  (m0, g0, e0), (m1, g1, e1) = results[0], results[16]
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
  np.testing.assert_allclose(e1["loss_sum"], e0["loss_sum"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-4), g0, g1)
  assert np.abs(g0["lm_head"]).max() > 1e-3  # the comparison is not of zeros
  assert not g1["lm_head"][:, CFG.vocab_size:].any() and not g1["embed"][CFG.vocab_size:].any()
