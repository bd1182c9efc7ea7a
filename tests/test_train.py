"""End to end through `lima_jax.train.run`, the function the CLI calls."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import ROOT, final_params
from lima_jax import checkpoint, config, train
from lima_jax.errors import LimaError


def tiny_config():
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.data.max_length = 128
  cfg.train.batch_size = 8
  cfg.train.epochs = 2
  cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_dim = 64, 2, 128
  return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = tiny_config()
  last = train.run(cfg, workdir)
  return cfg, workdir, last


def test_run_writes_checkpoints_metrics_and_tensorboard(finished_run):
  cfg, workdir, last = finished_run
  # The newest full state (checkpoint.max_to_keep=1); each epoch's params alone for selection.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["18"]
  assert {"1", "2"} <= set(os.listdir(os.path.join(workdir, "epochs")))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, 19))
  assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "step_time"} <= set(records[0])
  assert records[-1] == last
  assert [r["epoch"] for r in records] == [1] * 9 + [2] * 9
  # The LR of step s (1-based) is the schedule at s - 1: 1e-2 warming up over 10 steps.
  np.testing.assert_allclose(records[0]["lr"], 0.0, atol=1e-12)
  with open(os.path.join(workdir, "epochs.jsonl")) as f:
    epochs = [json.loads(line) for line in f]
  assert [e["epoch"] for e in epochs] == [1, 2] and epochs[1]["loss"] < epochs[0]["loss"]
  assert "dev_loss" in epochs[0] and "dev_perplexity" in epochs[0]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  meta = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints")).read_meta(18)
  assert meta["epoch"] == 2 and meta["model"]["d_model"] == 64 and len(meta["tokenizer_sha256"]) == 64


def test_stopping_after_a_checkpoint_and_rerunning_matches_an_uninterrupted_run(finished_run,
                                                                                  tmp_path):
  cfg, full_workdir, _ = finished_run
  workdir = str(tmp_path)
  stopped = tiny_config()
  stopped.train.stop_after_steps = 5  # mid-epoch: the checkpoint is at step 5
  train.run(stopped, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["5"]
  train.run(cfg, workdir)  # the same command again resumes at step 5
  jax.tree.map(np.testing.assert_array_equal, final_params(cfg, full_workdir),
               final_params(cfg, workdir))
  assert train.run(cfg, workdir) == {}  # complete: nothing more to do


def test_a_workdir_of_another_model_is_refused(finished_run):
  _, workdir, _ = finished_run
  other = tiny_config()
  other.model.d_model = 128
  with pytest.raises(LimaError, match=r"model.d_model=64.*128"):
    train.run(other, workdir)


def test_resuming_with_another_remat_policy_or_layer_loop_is_allowed(tmp_path):
  stopped = tiny_config()
  stopped.train.stop_after_steps = 2
  train.run(stopped, str(tmp_path))
  resumed = tiny_config()
  resumed.train.stop_after_steps = 3
  resumed.model.remat = "full"  # e.g. after running out of memory
  resumed.model.scan_layers = False  # the same stacked params, run as a Python loop
  assert train.run(resumed, str(tmp_path))["step"] == 3


def test_cli_shows_progress_and_exits_zero(tmp_path):
  args = ["--config.train.epochs=1", "--config.train.batch_size=16", "--config.data.max_length=64",
          "--config.model.n_layers=1", "--config.optimizer.warmup_steps=2",  # of 5 steps
          f"--workdir={tmp_path}"]
  proc = subprocess.run([sys.executable, "-m", "lima_jax.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "5/5" in proc.stderr and "loss=" in proc.stderr and "tok_s=" in proc.stderr
  assert "stopped at step 5/5" in proc.stdout
