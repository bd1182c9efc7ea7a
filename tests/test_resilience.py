"""Runs that are killed, preempted, corrupted or diverge: resume exactly or stop clearly."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, final_params, train_cli, tree_hashes
from lima_jax import checkpoint, config, train
from lima_jax.errors import LimaError

# 2 epochs of 9 steps; an interval checkpoint every 2 steps so kills land near checkpoint writes.
FLAGS = ["--config.train.epochs=2", "--config.train.batch_size=8", "--config.data.max_length=64",
         "--config.model.n_layers=1", "--config.model.d_model=64", "--config.model.ffn_dim=128",
         "--config.eval.generate_epochs=()", "--config.checkpoint.every_steps=2"]


def cli_config():
  """The same run as FLAGS, built in-process."""
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.train.epochs, cfg.train.batch_size, cfg.data.max_length = 2, 8, 64
  cfg.model.n_layers, cfg.model.d_model, cfg.model.ffn_dim = 1, 64, 128
  cfg.eval.generate_epochs = ()
  cfg.checkpoint.every_steps = 2
  return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train.run(cli_config(), workdir)
  return final_params(cli_config(), workdir)


def assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def checkpoint_write_in_progress(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt_dir) and any("tmp" in name for name in os.listdir(ckpt_dir))


def run_and_kill(workdir, *, after_seconds=None, during_checkpoint_write=False):
  """Starts training and SIGKILLs it once it is stepping: after a delay, or as soon as a
  checkpoint is being written. Returns True if it was killed before finishing."""
  proc = train_cli(*FLAGS, f"--workdir={workdir}", stdout=subprocess.PIPE,
                   stderr=subprocess.DEVNULL, text=True)
  proc.stdout.readline()  # the start-up line: set-up is done, stepping begins
  deadline = time.monotonic() + (after_seconds if after_seconds is not None else 120)
  while proc.poll() is None and time.monotonic() < deadline:
    if during_checkpoint_write and checkpoint_write_in_progress(workdir):
      break
    time.sleep(0.002)
  if proc.poll() is not None:
    return False
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return True


def test_sigkill_at_random_moments_then_rerun_matches_uninterrupted(reference, tmp_path):
  workdir = str(tmp_path)
  rng = random.Random(1234)
  killed_in_write = run_and_kill(workdir, during_checkpoint_write=True)
  kills = [killed_in_write] + [run_and_kill(workdir, after_seconds=rng.uniform(0.2, 2.5))
                               for _ in range(2)]
  assert killed_in_write and any(kills)
  finish = train_cli(*FLAGS, f"--workdir={workdir}",
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, err = finish.communicate(timeout=300)
  assert finish.returncode == 0, err[-2000:]
  assert_same_params(reference, final_params(cli_config(), workdir))
  # Steps logged after the checkpoint a rerun resumed from are logged once, by the rerun.
  metrics = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in metrics] == list(range(1, 19))


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(reference, tmp_path):
  workdir = str(tmp_path)
  proc = train_cli(*FLAGS, f"--workdir={workdir}", "--config.checkpoint.every_steps=0",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc.stdout.readline()
  time.sleep(1.0)  # mid-epoch
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  assert time.monotonic() - sent < 30
  assert "SIGTERM: checkpoint of step" in out and "(SIGTERM)" in out
  steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  assert steps and max(steps) < 18
  train.run(cli_config(), workdir)
  assert_same_params(reference, final_params(cli_config(), workdir))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
  workdir = str(tmp_path)
  cfg = cli_config()
  cfg.train.stop_after_steps = 12
  train.run(cfg, workdir)  # epoch checkpoint 9, interval checkpoints up to 12
  ckpt_dir = os.path.join(workdir, "checkpoints")
  newest = max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert newest == 12
  state_dir = os.path.join(ckpt_dir, str(newest), "state")
  for base, _, files in os.walk(state_dir):  # truncate every array file of the newest
    for name in files:
      if "manifest" in name or name.startswith("d"):
        open(os.path.join(base, name), "wb").close()
  train.run(cli_config(), workdir)
  assert_same_params(reference, final_params(cli_config(), workdir))


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  diverging = cli_config()
  # Warmup from 0: step 1 leaves the params as they are, step 2 (LR 1e29) blows them up, and
  # the loss of step 3 is not finite. (A rerun may not change the LR, so both runs diverge.)
  diverging.optimizer.learning_rate = diverging.optimizer.end_learning_rate = 1e30
  diverging.train.stop_after_steps = 2
  train.run(diverging, workdir)
  before = tree_hashes(os.path.join(workdir, "checkpoints"))
  diverging.train.stop_after_steps = 0
  with pytest.raises(LimaError, match=r"^step 3: non-finite loss .* last good checkpoint is "
                                      r"step 2\b.*train.max_bad_steps"):
    train.run(diverging, workdir)
  after = tree_hashes(os.path.join(workdir, "checkpoints"))
  assert {k: v for k, v in after.items() if k.startswith("2/")} == {
      k: v for k, v in before.items() if k.startswith("2/")}


def test_bad_steps_can_be_skipped_up_to_the_limit(tmp_path):
  cfg = cli_config()
  cfg.optimizer.learning_rate = cfg.optimizer.end_learning_rate = 1e30
  cfg.optimizer.warmup_steps = 0
  cfg.train.max_bad_steps = 100
  last = train.run(cfg, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  bad = [r for r in records if not (np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]))]
  assert last["step"] == 18 and len(records) == 18 and 0 < len(bad) <= 100


def test_leftovers_of_a_killed_write_are_gone_once_checkpoints_open(tmp_path):
  # Orbax deletes them on a thread; a process that exits right after opening (a refused
  # workdir) must not cut that thread off mid-delete.
  leftover = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000"
  (leftover / "state").mkdir(parents=True)
  (leftover / "state" / "shard").write_bytes(b"\0" * 1024)
  ckpts = checkpoint.Checkpoints(str(tmp_path / "checkpoints"))
  assert not leftover.exists()
  assert ckpts.all_steps() == []
  ckpts.close()


def test_a_second_ctrl_c_stops_at_once_in_one_line_and_the_rerun_resumes(reference, tmp_path):
  """Before, a second Ctrl-C raised KeyboardInterrupt wherever the run was: a page of traceback
  (Orbax's writer thread included), and the rerun logged again the steps after the checkpoint
  it resumed from."""
  workdir = str(tmp_path)
  metrics = os.path.join(workdir, "metrics.jsonl")
  proc = train_cli(*FLAGS, f"--workdir={workdir}", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
  proc.stdout.readline()
  while proc.poll() is None and len(read_jsonl(metrics)) < 3:
    time.sleep(0.01)
  # Ctrl-C until it ends: the first stops after the step in flight, a later one at once (two
  # signals that land while one XLA call runs count once, so keep pressing).
  while proc.poll() is None:
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, out[-2000:] + err[-2000:]
  assert "Traceback" not in err
  assert re.fullmatch(r"lima_jax: interrupted at once by a second Ctrl-C; (the newest checkpoint "
                      r"is step \d+ in \S+: rerun the same command to resume from it|no checkpoint"
                      r" in \S+ yet: rerun the same command to start afresh)",
                      err.strip().splitlines()[-1]), err[-2000:]
  train.run(cli_config(), workdir)
  assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, 19))
  assert_same_params(reference, final_params(cli_config(), workdir))


def read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def test_a_second_run_on_a_workdir_in_use_is_refused_and_a_killed_run_never_blocks(tmp_path):
  """Before, both runs trained: both wrote checkpoints and every metrics row appeared twice."""
  workdir = str(tmp_path)
  long_run = [*FLAGS, "--config.train.epochs=200", f"--workdir={workdir}"]
  first = train_cli(*long_run, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    first.stdout.readline()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    while first.poll() is None and not any(n.isdigit() for n in os.listdir(ckpt_dir)):
      time.sleep(0.05)
    second = train_cli(*long_run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = second.communicate(timeout=300)
    assert first.poll() is None, "the first run ended before the second one tried"
  finally:
    first.send_signal(signal.SIGKILL)  # its lock goes with it
    first.wait()
  assert second.returncode == 2, err[-2000:]
  assert "Traceback" not in err and "params" not in out  # refused before training
  assert re.fullmatch(
      rf"error: --workdir: {re.escape(workdir)} is in use by another run \(host "
      rf"{re.escape(socket.gethostname())}, pid {first.pid}, since "
      r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d\); wait for it to end or stop it, or train "
      r"in another --workdir", err.strip().splitlines()[-1]), err[-2000:]
  newest = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  cfg = cli_config()
  cfg.train.epochs, cfg.train.stop_after_steps = 200, newest + 1
  assert train.run(cfg, workdir)["step"] == newest + 1  # resumed, though the file is still there
  assert os.path.exists(os.path.join(workdir, "run.lock"))
