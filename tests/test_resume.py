"""Resuming a run through `train.run`: which config changes are refused, and what the logs of
an interrupted run say (the same as an uninterrupted run's, each step once)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, tensorboard_steps, tree_hashes
from lima_jax import config, train
from lima_jax.errors import LimaError

# The step's measured speed differs between runs; everything else in a row must not.
TIMING = ("step_time", "tokens_per_s")


def tiny_config():
  """2 epochs of 9 steps (71 sample conversations at batch 8)."""
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.data.max_length, cfg.data.dev_path = 64, ""
  cfg.train.batch_size, cfg.train.epochs = 8, 2
  cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_dim = 64, 1, 128
  cfg.optimizer.warmup_steps = 2
  cfg.eval.generate_epochs = ()
  cfg.checkpoint.async_save = False
  return cfg


def rows(workdir, name, drop=TIMING):
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """An uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  train.run(tiny_config(), workdir)
  return workdir


def _changed(key, value):
  def change(cfg):
    section, name = key.split(".")
    cfg[section][name] = value
  return change


def _fewer_examples(tmp_path):
  def change(cfg):
    with open(cfg.data.train_path, encoding="utf-8") as f:
      lines = f.readlines()
    path = tmp_path / "fewer.jsonl"
    path.write_text("".join(lines[:40]), encoding="utf-8")  # 5 steps per epoch instead of 9
    cfg.data.train_path = str(path)
  return change


@pytest.mark.parametrize("key, change, said", [
    ("train.epochs", _changed("train.epochs", 3), "train.epochs=2.*train.epochs=3"),
    ("train.batch_size", _changed("train.batch_size", 16), "train.batch_size=8.*batch_size=16"),
    ("optimizer.learning_rate", _changed("optimizer.learning_rate", 2e-2),
     "optimizer.learning_rate=0.01.*learning_rate=0.02"),
    ("optimizer.end_learning_rate", _changed("optimizer.end_learning_rate", 0.0),
     "optimizer.end_learning_rate=0.001.*end_learning_rate=0.0"),
    ("optimizer.warmup_steps", _changed("optimizer.warmup_steps", 0),
     "optimizer.warmup_steps=2.*warmup_steps=0"),
    ("data.train_path", None, "data.train_path's steps per epoch=9.*per epoch=5"),
])
def test_a_rerun_that_changes_the_schedule_is_refused(finished, tmp_path, key, change, said):
  """Before, a finished run rerun with more epochs went on training with its LR jumping up
  (the schedule of a longer run, from the middle), and with fewer epochs it said "complete"."""
  del key
  cfg = tiny_config()
  (change or _fewer_examples(tmp_path))(cfg)
  before = tree_hashes(os.path.join(finished, "checkpoints"))
  where = re.escape(finished)
  with pytest.raises(LimaError, match=rf"^{where}: holds a run trained with {said}, which would "
                                      rf"change its step count or learning-rate schedule "
                                      rf"mid-run; .*init_from={where} "):
    train.run(cfg, finished)
  assert tree_hashes(os.path.join(finished, "checkpoints")) == before


def test_a_rerun_with_another_eot_is_refused_naming_the_key(finished):
  """EOT </s> instead of a new row: before, the run was refused only as another vocabulary, not
  naming data.eot_token."""
  cfg = tiny_config()
  cfg.data.eot_token = "</s>"
  before = tree_hashes(os.path.join(finished, "checkpoints"))
  with pytest.raises(LimaError, match=r"^data\.eot_token: the checkpoints in .* were trained "
                                      r"with EOT id 1000, this config gives EOT id 2; "):
    train.run(cfg, finished)
  assert tree_hashes(os.path.join(finished, "checkpoints")) == before


def test_the_cli_refuses_more_epochs_in_one_line(finished):
  before = tree_hashes(os.path.join(finished, "checkpoints"))
  args = ["--config.train.epochs=3", "--config.train.batch_size=8",
          "--config.data.max_length=64", "--config.data.dev_path=", "--config.model.d_model=64",
          "--config.model.n_layers=1", "--config.model.ffn_dim=128",
          "--config.optimizer.warmup_steps=2", "--config.eval.generate_epochs=()"]
  proc = subprocess.run([sys.executable, "-m", "lima_jax.train", *args, f"--workdir={finished}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], proc.stderr
  assert "train.epochs=2" in proc.stderr and f"--config.init_from={finished}" in proc.stderr
  assert tree_hashes(os.path.join(finished, "checkpoints")) == before


def test_stop_after_steps_mesh_and_micro_batches_stay_changeable(tmp_path):
  cfg = tiny_config()
  cfg.train.stop_after_steps = 2
  train.run(cfg, str(tmp_path))
  cfg.train.stop_after_steps = 3
  cfg.mesh.data, cfg.mesh.fsdp = 1, 4  # how the same steps are computed, not which
  cfg.train.micro_batch_rows = -1
  assert train.run(cfg, str(tmp_path))["step"] == 3


def test_epoch_losses_are_exact_across_mid_epoch_resumes(finished, tmp_path):
  """Stopped at step 5 (epoch 1) and 13 (epoch 2): each epoch's train loss is the uninterrupted
  run's, bit for bit. Before, it averaged only the steps after the resume (epoch 1 from steps
  6-9, epoch 2 from steps 14-18)."""
  workdir = str(tmp_path)
  for stop in (5, 13, 0):
    cfg = tiny_config()
    cfg.train.stop_after_steps = stop
    train.run(cfg, workdir)
  assert rows(workdir, "epochs.jsonl") == rows(finished, "epochs.jsonl")
  assert len(rows(workdir, "epochs.jsonl")) == 2


def test_a_resume_from_an_older_checkpoint_logs_each_step_once(finished, tmp_path):
  """Steps 10-12 were logged, but their checkpoint never reached the disk (a run killed while
  writing it, or stopped by a second Ctrl-C): the rerun resumes at 9 and logs 10-12 again.
  Before, metrics.jsonl then held those rows twice, and TensorBoard showed them twice."""
  workdir = str(tmp_path)
  cfg = tiny_config()
  cfg.train.stop_after_steps = 12
  train.run(cfg, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 13, "lo')  # and a row cut short by the kill
  cfg.train.stop_after_steps = 0
  train.run(cfg, workdir)
  assert [r["step"] for r in rows(workdir, "metrics.jsonl")] == list(range(1, 19))
  # TensorBoard too: the rerun hides the first run's steps 10-12 (they were logged twice).
  assert tensorboard_steps(workdir, "train/loss") == list(range(1, 19))
  assert rows(workdir, "metrics.jsonl") == rows(finished, "metrics.jsonl")
  assert rows(workdir, "epochs.jsonl") == rows(finished, "epochs.jsonl")
