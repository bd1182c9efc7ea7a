"""The LIMA presets carry the paper's numbers, computed by the code the trainer runs, and runs
follow that schedule to its last step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import final_params
from lima_jax import config, data, optim, train, train_state
from lima_jax.errors import LimaError
from lima_jax.model import residual_dropout_rates

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def preset(name):
  cfg = config.from_file(os.path.join(CONFIGS, name))
  cfg.data.train_path = cfg.data.tokenizer_path = "set-by-user"
  config.validate(cfg)
  return cfg


def test_65b_preset_has_the_papers_schedule_on_1000_examples():
  cfg = preset("lima_65b.py")
  assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.ffn_dim) == (
      8192, 80, 64, 22016)
  plan = data.EpochPlan(1000, cfg.train.batch_size, cfg.seed)
  total = plan.steps_per_epoch * cfg.train.epochs
  assert (plan.steps_per_epoch, total) == (32, 480)
  _, schedule = optim.make_optimizer(cfg.optimizer, total)
  # "linearly decaying to 1e-6 by the end of training": step s (0-based) uses
  # 1e-5 - 9e-6 * s / 479, the first step 1e-5 and the last one (479) exactly 1e-6.
  steps = np.arange(total)
  np.testing.assert_allclose(schedule(steps), 1e-5 - 9e-6 * steps / 479, rtol=1e-5)
  assert schedule(479) == np.float32(1e-6)
  np.testing.assert_allclose(
      residual_dropout_rates(cfg.model.n_layers, cfg.model.residual_dropout_top),
      0.3 * np.arange(80) / 79, rtol=1e-6)


@pytest.mark.parametrize("name", ["lima_65b.py", "lima_7b.py"])
def test_presets_use_the_papers_optimizer(name):
  o = preset(name).optimizer
  assert (o.learning_rate, o.end_learning_rate, o.warmup_steps) == (1e-5, 1e-6, 0)
  assert (o.b1, o.b2, o.weight_decay) == (0.9, 0.95, 0.1)


def test_7b_preset_uses_the_smaller_model_settings():
  cfg = preset("lima_7b.py")
  assert (cfg.train.batch_size, cfg.model.residual_dropout_top) == (64, 0.2)
  assert cfg.data.max_length == 2048 and cfg.train.epochs == 15


def test_weight_decay_skips_only_norm_scales():
  params = {"embed": 0, "blocks": {"attn_norm": {"scale": 0}, "attn": {"wq": 0}},
            "final_norm": {"scale": 0}, "lm_head": 0}
  assert optim.decay_mask(params) == {
      "embed": True, "blocks": {"attn_norm": {"scale": False}, "attn": {"wq": True}},
      "final_norm": {"scale": False}, "lm_head": True}


def test_warmup_reaches_the_peak_then_decays_to_the_end_at_the_last_step():
  schedule = optim.lima_schedule(1e-5, 1e-6, total_steps=101, warmup_steps=10)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(55), schedule(100)],
                             [0.0, 5e-6, 1e-5, 5.5e-6, 1e-6], rtol=1e-5, atol=1e-12)
  assert schedule(100) == np.float32(1e-6)


# Through train.run, the function `python -m lima_jax.train` calls.

def tiny_run(**optimizer):
  """71 sample conversations at batch 32 (3 steps), or at batch 8 (9 steps), 1 epoch."""
  cfg = config.from_file(os.path.join(CONFIGS, "toy.py"))
  cfg.data.max_length, cfg.data.dev_path = 64, ""
  cfg.train.batch_size, cfg.train.epochs = 32, 1
  cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_dim = 64, 1, 128
  cfg.eval.generate_epochs = ()
  cfg.checkpoint.async_save = False
  cfg.optimizer.learning_rate, cfg.optimizer.end_learning_rate = 1e-5, 1e-6
  cfg.optimizer.warmup_steps = 0
  for key, value in optimizer.items():
    cfg.optimizer[key] = value
  return cfg


def logged(workdir, key):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)[key] for line in f]


@pytest.mark.parametrize("warmup, expected", [(0, [1e-5, 5.5e-6, 1e-6]), (1, [0.0, 1e-5, 1e-6])])
def test_the_last_step_of_a_run_uses_end_learning_rate(tmp_path, warmup, expected):
  # Before: 1e-5, 7e-6, 4e-6 (no warmup) and 0, 7e-6, 4e-6 (warmup 1): the schedule reached
  # end_learning_rate one step after the last.
  train.run(tiny_run(warmup_steps=warmup), str(tmp_path))
  lrs = logged(str(tmp_path), "lr")
  assert lrs == pytest.approx(expected, rel=1e-6) and lrs[-1] == np.float32(1e-6)


def test_warmup_as_long_as_the_run_is_refused(tmp_path):
  with pytest.raises(LimaError, match=r"^config optimizer.warmup_steps: 3 warmup steps, but the "
                                      r"run has only 3 steps.*at most 2$"):
    train.run(tiny_run(warmup_steps=3), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_after_a_skipped_step_the_applied_lr_is_the_logged_one(tmp_path, monkeypatch):
  """Step 4 of 9 has a NaN loss and is skipped; the last step's LR is 0 (end_learning_rate), so
  it must leave the params exactly as step 8 left them. When the LR followed optax's own count,
  which a skipped update does not advance, step 9 applied step 8's LR (1.25e-3) while the log
  said 0, and the params moved."""
  seed = tiny_run().seed
  poisoned = jax.random.key_data(  # the dropout key of step index 3, micro-batch 0
      jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), 0))
  real_loss = train_state.token_loss

  def token_loss(model, batch, *, dropout_key=None, constrain=None, chunk_tokens=0):
    total, count = real_loss(model, batch, dropout_key=dropout_key, constrain=constrain,
                             chunk_tokens=chunk_tokens)
    hit = jnp.all(jax.random.key_data(dropout_key) == poisoned)
    return jnp.where(hit, jnp.nan, total), count

  monkeypatch.setattr(train_state, "token_loss", token_loss)
  cfg = tiny_run(learning_rate=1e-2, end_learning_rate=0.0)
  cfg.train.batch_size, cfg.train.max_bad_steps = 8, 1
  workdir = str(tmp_path)
  cfg.train.stop_after_steps = 8
  train.run(cfg, workdir)
  after_8 = final_params(cfg, workdir)
  cfg.train.stop_after_steps = 0
  assert train.run(cfg, workdir)["step"] == 9
  losses, lrs = logged(workdir, "loss"), logged(workdir, "lr")
  assert [np.isnan(x) for x in losses] == [False] * 3 + [True] + [False] * 5
  assert lrs[-1] == 0.0 and lrs[-2] == pytest.approx(1.25e-3)
  jax.tree.map(np.testing.assert_array_equal, final_params(cfg, workdir), after_8)
