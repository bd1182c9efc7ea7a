"""The LIMA presets carry the paper's numbers, computed by the code the trainer runs."""

import os

import numpy as np
import pytest

from lima_jax import config, data, optim
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
  for epoch in range(cfg.train.epochs + 1):
    # The LR in effect after epoch e is the one used by the first step of epoch e + 1.
    np.testing.assert_allclose(schedule(epoch * plan.steps_per_epoch), 1e-5 - 6e-7 * epoch,
                               rtol=1e-5)
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


def test_warmup_then_the_same_linear_decay():
  schedule = optim.lima_schedule(1e-5, 1e-6, total_steps=100, warmup_steps=10)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)],
                             [0.0, 5e-6, 1e-5 - 9e-6 * 0.1, 1e-6], rtol=1e-5, atol=1e-12)
