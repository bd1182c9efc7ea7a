"""Micro-batches with gradient accumulation give the update of the whole step at once.

A step's examples are packed into rows, the rows grouped into micro-batches
(lima_jax.data.StepLayout); the train step sums the micro-batches' token losses and gradients,
each over the step's token count, and skips the micro-batches that hold only padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import data, optim, sharding, train
from lima_jax.config import base_config
from lima_jax.errors import LimaError
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer, _sum_over_micro_batches

CFG = LlamaConfig(vocab_size=301, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
LENGTH = 64


def _examples(seed=0, count=12):
  rng = np.random.default_rng(seed)
  return [data.Example(ids=rng.integers(1, 300, n).astype(np.int32),
                       loss_mask=(rng.random(n) < 0.7).astype(np.float32))
          for n in rng.integers(8, LENGTH, count)]


def _step(layout, examples, mesh):
  opt_cfg = base_config().optimizer
  opt_cfg.learning_rate = 1e-3
  tx, schedule = optim.make_optimizer(opt_cfg, total_steps=10)
  trainer = Trainer(CFG, tx, schedule, mesh, seed=0)
  state, metrics = trainer.train_step(trainer.init(0), trainer.put_batch(layout.pack(examples)))
  return jax.device_get(state["params"]), jax.device_get(metrics)


def _assert_same_step(a, b):
  (params_a, metrics_a), (params_b, metrics_b) = a, b
  assert metrics_a["tokens"] == metrics_b["tokens"]
  np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics_a["grad_norm"], metrics_b["grad_norm"], rtol=1e-4)
  # Adam's first update is about +-lr per element whatever the gradient's size: an element whose
  # gradient is at float noise level may move differently, bounded by 5% of lr.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=5e-5, rtol=0),
               params_a, params_b)


def test_micro_batches_give_the_whole_steps_update():
  examples = _examples()
  rows = data.rows_needed([[len(e.ids) for e in examples]], LENGTH)
  assert rows >= 4  # several micro-batches of one row, the last ones all padding below
  one_device = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  whole = _step(data.StepLayout.holding(rows, rows, LENGTH), examples, one_device)
  _assert_same_step(whole, _step(data.StepLayout(rows + 3, 1, LENGTH), examples, one_device))
  _assert_same_step(whole, _step(data.StepLayout.holding(rows, 2, LENGTH), examples, one_device))
  # On the 8-device mesh: micro-batches of one row per batch shard (2 x 2).
  _assert_same_step(whole, _step(data.StepLayout.holding(rows, 4, LENGTH), examples,
                                 sharding.make_mesh(2, 2, 2)))


def test_padding_micro_batches_are_not_computed():
  calls = []
  batch = {"segment_ids": jnp.array([[[1, 1]], [[1, 0]], [[0, 0]], [[0, 0]]]),
           "tokens": jnp.ones((4, 1, 2), jnp.int32)}

  def count(micro, index):
    jax.debug.callback(lambda i: calls.append(int(i)), index)
    return jnp.sum(micro["segment_ids"])

  total = jax.jit(lambda b: _sum_over_micro_batches(
      count, b, lambda: jnp.zeros((), jnp.int32)))(batch)
  jax.effects_barrier()
  assert int(total) == 3 and calls == [0, 1]


def _cfg(micro_rows, length=LENGTH):
  cfg = base_config()
  cfg.data.max_length, cfg.train.micro_batch_rows = length, micro_rows
  return cfg


def test_layout_rows_split_over_the_batch_shards():
  mesh = sharding.make_mesh(2, 2, 2)  # 4 batch shards
  lengths = [[len(e.ids) for e in _examples(seed)] for seed in range(3)]
  worst = data.rows_needed(lengths, LENGTH)
  layout = train.step_layout(_cfg(0), lengths, mesh)
  assert (layout.rows, layout.micro_batches) == (4, -(-worst // 4))
  whole = train.step_layout(_cfg(-1), lengths, mesh)
  assert (whole.micro_batches, whole.rows) == (1, -(-worst // 4) * 4)
  assert train.step_layout(_cfg(8), lengths, mesh, rows_per_step=20).shape == (3, 8, LENGTH)
  with pytest.raises(LimaError, match=r"^config train\.micro_batch_rows: 6 rows .* multiple of 4$"):
    train.step_layout(_cfg(6), lengths, mesh)


def test_layout_packs_rows_in_order_into_micro_batches():
  examples = _examples()
  rows = data.rows_needed([[len(e.ids) for e in examples]], LENGTH)
  flat = data.pack_step(examples, rows, LENGTH)
  layout = data.StepLayout(rows + 1, 1, LENGTH)
  packed = layout.pack(examples)
  for key, value in flat.items():
    assert packed[key].shape == (rows + 1, 1, LENGTH)
    np.testing.assert_array_equal(packed[key][:rows, 0], value)
    assert not packed[key][rows:].any()
