"""`python -m lima_jax.plan`: the real train step compiled for a topology's fake devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lima_jax import config, data, plan, sharding, topology, train
from lima_jax.errors import LimaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset(name):
  return config.from_file(os.path.join(ROOT, "configs", f"{name}.py"))


def small_lima():
  """lima_65b's recipe on a model small enough to compile in seconds."""
  cfg = preset("lima_65b")
  cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 256, 4, 4
  cfg.model.n_kv_heads, cfg.model.ffn_dim = 4, 512
  cfg.data.max_length = 1024
  return cfg


def test_topology_names_count_chips():
  assert [topology.parse(n).devices for n in ("v4-8", "v4-128", "v5p-32", "v5e-16",
                                              "v5litepod-8", "v6e-4", "cpu:8")] == [4, 64, 16, 16,
                                                                                    8, 4, 8]
  assert topology.parse("v5p-32").hbm_bytes == 95 * topology.GIB
  assert topology.parse("v5litepod-8").name == "v5e-8"
  for bad in ("v4-12", "v5e-2", "v9-8", "v5p", "cpu:0", "gpu:8"):
    with pytest.raises(LimaError, match="--topology"):
      topology.parse(bad)
  assert topology.slice_for(topology.parse("v4-8"), 41) == "v4-128"
  assert topology.slice_for(topology.parse("v5e-4"), 5) == "v5e-8"


@pytest.mark.parametrize("name, dims", [
    ("lima_13b", (5120, 40, 40, 40, 13824, 10_000.0, 1e-6)),
    ("lima_33b", (6656, 60, 52, 52, 17920, 10_000.0, 1e-6)),
    ("llama2_7b", (4096, 32, 32, 32, 11008, 10_000.0, 1e-5)),
    ("llama3_8b", (4096, 32, 32, 8, 14336, 500_000.0, 1e-5)),
    ("llama31_8b", (4096, 32, 32, 8, 14336, 500_000.0, 1e-5)),
])
def test_presets_smaller_than_65b_follow_the_paper(name, dims):
  cfg = preset(name)
  m = cfg.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.rope_theta,
          m.norm_eps) == dims
  assert (cfg.train.batch_size, m.residual_dropout_top, cfg.train.epochs) == (64, 0.2, 15)
  assert cfg.data.max_length == (4096 if name == "llama2_7b" else 2048)
  assert m.remat in config.REMAT_POLICIES and cfg.mesh.fsdp == -1
  plan._validate(cfg)  # pylint: disable=protected-access


def test_llama31_presets_scale_rope_as_llama31_does():
  for name in ("llama31_8b", "llama31_70b"):
    m = preset(name).model
    assert (m.rope_scaling_type, m.rope_scaling_factor, m.rope_scaling_low_freq_factor,
            m.rope_scaling_high_freq_factor, m.rope_scaling_original_max_position) == (
                "llama3", 8.0, 1.0, 4.0, 8192), name
  assert preset("llama3_8b").model.rope_scaling_type == "default"
  cfg = preset("llama31_70b")  # LIMA's 65B recipe on LLaMA-3.1-70B's dimensions
  m = cfg.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.rope_theta,
          m.norm_eps, m.tie_embeddings) == (8192, 80, 64, 8, 28672, 500_000.0, 1e-5, False)
  assert (cfg.train.batch_size, m.residual_dropout_top, cfg.train.epochs) == (32, 0.3, 15)
  plan._validate(cfg)  # pylint: disable=protected-access


def test_lima_recipe_counts_steps_lr_and_dropout():
  report = plan.plan_run(small_lima(), topology.parse("cpu:8"), num_examples=1000)
  assert report["params"] > 0 and report["fits"]
  assert (report["steps_per_epoch"], report["total_steps"]) == (32, 480)
  lrs = report["lr_at_epoch_end"]
  # The LR of each epoch's last step (31, 63, ..., 479): 1e-5 - 9e-6 * step / 479, so the last
  # epoch ends exactly at end_learning_rate (the step after the last one, 480, gave 9.4e-6 first).
  assert lrs == pytest.approx([1e-5 - 9e-6 * (32 * e - 1) / 479 for e in range(1, 16)])
  assert lrs[-1] == np.float32(1e-6)
  assert report["dropout_per_layer"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
  # 32 examples x ~750 tokens fill 24 rows of 1024: 3 micro-batches of one row per batch shard.
  assert report["rows_per_step"] == 24 and report["rows_source"].startswith("assumed")
  assert (report["micro_batches"], report["micro_batch_rows"]) == (3, 8)
  assert 0 < report["bytes_per_device"] <= report["hbm_bytes_per_device"]
  assert report["bytes_per_device"] >= report["argument_bytes"] + report["temp_bytes"]
  assert report["step_time_s"] is None  # no peak FLOP/s for a CPU


def test_planning_from_data_counts_the_micro_batches_each_step_fills():
  cfg = small_lima()
  cfg.data.train_path = config.sample_data("train.jsonl")
  cfg.data.tokenizer_path = config.sample_data("tokenizer.model")
  cfg.data.max_length, cfg.train.batch_size = 256, 8
  report = plan.plan_run(cfg, topology.parse("cpu:8"))
  assert report["num_examples"] == 71 and report["rows_source"].startswith("the worst step")
  # The same layout and per-step rows as training computes them, by the trainer's own code.
  tokenizer = data.load_tokenizer(cfg.data.tokenizer_path)
  examples = plan._load_examples(cfg, tokenizer)  # pylint: disable=protected-access
  epochs = data.EpochPlan(len(examples), cfg.train.batch_size, cfg.seed)
  counts = train.step_token_counts(examples, epochs, range(report["total_steps"]))
  layout = train.step_layout(cfg, counts, sharding.make_mesh(1, -1, 1, jax.devices()[:8]))
  assert (report["micro_batches"], report["micro_batch_rows"]) == (layout.micro_batches, 8)
  computed = [-(-data.rows_needed([c], 256) // 8) * 8 for c in counts]
  assert report["mean_rows_computed"] == pytest.approx(sum(computed) / len(computed))
  assert report["mean_rows_computed"] <= layout.micro_batches * layout.rows


def test_a_dimension_that_does_not_divide_its_mesh_axis_is_refused():
  cfg = preset("lima_33b")  # 52 heads
  cfg.mesh.fsdp, cfg.mesh.tensor = 1, 8
  with pytest.raises(LimaError, match=r"model\.n_(kv_)?heads.*52.*tensor=8"):
    plan.plan_run(cfg, topology.parse("cpu:8"), num_examples=1000)


def test_65b_does_not_fit_a_v4_8_and_the_advice_says_what_to_change():
  cfg = preset("lima_65b")
  cfg.train.micro_batch_rows = -1  # a whole step at once
  topo = topology.parse("v4-8")
  report = plan.plan_run(cfg, topo, num_examples=1000)
  assert not report["fits"] and report["bytes_per_device"] > 32 * topology.GIB
  tips = plan.advice(report, cfg, topo)
  assert "more fsdp" in tips[0] and "--topology=v4-" in tips[0]
  assert any("micro_batch_rows=0" in tip for tip in tips)


def test_a_topology_larger_than_the_started_backend_is_refused():
  with pytest.raises(LimaError, match="fresh process"):
    plan.plan_run(small_lima(), topology.parse("cpu:16"), num_examples=1000)


def test_cli_plans_65b_on_v5p_32_as_json():
  env = dict(os.environ, XLA_FLAGS="")  # the plan sets its own device count
  result = subprocess.run(
      [sys.executable, "-m", "lima_jax.plan", "--config=configs/lima_65b.py",
       "--topology=v5p-32", "--num_examples=1000", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report["fits"] and report["devices"] == 16
  assert (report["steps_per_epoch"], report["total_steps"]) == (32, 480)
  assert report["params"] == pytest.approx(65.3e9, rel=0.01)
  assert len(report["lr_at_epoch_end"]) == 15 and len(report["dropout_per_layer"]) == 80
  assert report["dropout_per_layer"][-1] == pytest.approx(0.3)
  assert report["hbm_bytes_per_device"] == 95 * topology.GIB
  assert report["step_time_s"] > 0


def test_cli_errors_are_one_line():
  result = subprocess.run([sys.executable, "-m", "lima_jax.plan", "--topology=v5p-33"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --topology: v5p-33: v5p slices come in sizes a multiple of 8"]


def test_cli_shows_what_the_chunked_loss_saves_on_a_llama3_vocabulary():
  """llama3_8b.py's 128,257-column vocabulary on a model small enough to compile quickly: the
  unchunked step holds each chip's [1 row, 512, 128,384] fp32 logits (251 MiB) and their
  gradient; 128-position chunks hold a quarter of that."""
  reports = {}
  for chunk in (0, 128):
    result = subprocess.run(
        [sys.executable, "-m", "lima_jax.plan", "--config=configs/llama3_8b.py",
         "--topology=v5p-8", "--vocab_size=128257", f"--config.train.loss_chunk_tokens={chunk}",
         "--config.model.d_model=128", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
         "--config.model.ffn_dim=256", "--config.model.n_layers=1",
         "--config.data.max_length=512", "--config.train.batch_size=8", "--json"],
        cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
        timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reports[chunk] = json.loads(result.stdout)
  assert reports[128]["loss_chunk_tokens"] == 128 and reports[128]["micro_batch_rows"] == 4
  logits = 512 * 128_384 * 4  # one row per chip
  saved = reports[0]["temp_bytes"] - reports[128]["temp_bytes"]
  assert saved > 1.5 * logits, (reports[0]["temp_bytes"], reports[128]["temp_bytes"])
