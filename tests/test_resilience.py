"""Runs that are killed, preempted, corrupted or diverge: resume exactly or stop clearly."""

import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from helpers import ROOT, final_params, train_cli, tree_hashes
from lima_jax import checkpoint, config, loop, run_files, train
from lima_jax.weights import pretrained
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


def run_and_kill(workdir, **kwargs):
  return helpers.run_and_kill(FLAGS, workdir, **kwargs)


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
  # Something to fall back to: epoch 9's state written even though interval 8's may still be
  # writing (when_idle could skip it), and kept beside step 12's (max_to_keep=1 keeps the newest).
  cfg.checkpoint.epoch_state, cfg.checkpoint.max_to_keep = "always", 2
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


@pytest.mark.parametrize("policy, steps", [("never", ["18"]), ("always", ["18", "9"])])
def test_epoch_state_decides_which_epoch_ends_write_the_full_state(tmp_path, policy, steps):
  cfg = cli_config()
  cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep = 0, 0  # keep every one written
  cfg.checkpoint.epoch_state = policy
  train.run(cfg, str(tmp_path))
  assert sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == steps


def test_an_epoch_end_skips_the_full_state_while_the_last_one_is_being_written(tmp_path):
  cfg = cli_config()
  ckpts = checkpoint.Checkpoints(str(tmp_path / "checkpoints"))
  try:
    # 256 MB: its background write takes far longer than the next call.
    ckpts.save(1, {"w": jnp.zeros((64, 1024, 1024), jnp.float32)}, {})
    assert ckpts.writing()
    assert not loop.epoch_state_due(cfg, ckpts)
    cfg.checkpoint.epoch_state = "always"
    assert loop.epoch_state_due(cfg, ckpts)
    ckpts.wait()
    assert not ckpts.writing()
    cfg.checkpoint.epoch_state = "when_idle"
    assert loop.epoch_state_due(cfg, ckpts)
  finally:
    ckpts.close()


def test_the_next_step_is_dispatched_before_the_last_ones_metrics_are_read(tmp_path, monkeypatch):
  """The device never waits for the host between steps, except where the loop needs the state
  (here after step 5); the records are those of steps run one at a time."""
  setup = train.prepare(cli_config(), str(tmp_path))
  events = []

  class Recorded:  # the real trainer, its dispatches logged
    def __init__(self, trainer):
      self._trainer = trainer

    def __getattr__(self, name):
      return getattr(self._trainer, name)

    def train_step(self, state, batch):
      events.append(("dispatch", int(jax.device_get(state["step"]))))
      return self._trainer.train_step(state, batch)

  read = loop._read  # pylint: disable=protected-access
  monkeypatch.setattr(loop, "_read", lambda s, running, prev: (
      events.append(("read", running[0])) or read(s, running, prev)))
  runs = {}
  for name, hold in (("pipelined", lambda done: done == 5), ("one at a time", lambda done: True)):
    events.clear()
    piped = dataclasses.replace(setup, trainer=Recorded(setup.trainer))
    out = [(state is not None, record) for state, record in loop.pipelined_steps(
        piped, setup.trainer.init(0), range(0, 8), hold)]
    runs[name] = (list(events), out)
  events_, out = runs["pipelined"]
  assert events_[:4] == [("dispatch", 0), ("dispatch", 1), ("read", 0), ("dispatch", 2)]
  # Held after step 5 (index 4): its metrics are read before step 6 is dispatched.
  assert events_.index(("read", 4)) < events_.index(("dispatch", 5))
  assert events_.index(("dispatch", 4)) < events_.index(("read", 3))
  assert [held for held, _ in out] == [False] * 4 + [True] + [False] * 2 + [True]
  serial_events, serial = runs["one at a time"]
  assert serial_events[:3] == [("dispatch", 0), ("read", 0), ("dispatch", 1)]
  for (_, a), (_, b) in zip(out, serial):
    assert {k: a[k] for k in ("step", "epoch", "loss", "grad_norm", "lr", "tokens")} == {
        k: b[k] for k in ("step", "epoch", "loss", "grad_norm", "lr", "tokens")}
  assert all(r["step_time"] > 0 for _, r in out)


def test_selection_params_export_in_bf16_and_restore_as_fp32(tmp_path):
  cfg = cli_config()
  setup = train.prepare(cfg, str(tmp_path))
  params = setup.trainer.init(0)["params"]
  writer = run_files.EpochParamsWriter(str(tmp_path), async_save=True, dtype="bfloat16")
  writer.save(3, params, dict(setup.meta, step=27, epoch=3))
  writer.close()
  kept = run_files.kept_epochs(str(tmp_path))[3]
  assert kept.meta["export_dtype"] == "bfloat16"
  stored = ocp.PyTreeCheckpointer().metadata(os.path.join(kept.directory, "3", "state"))
  assert {str(x.dtype) for x in jax.tree.leaves(stored.item_metadata.tree)} == {"bfloat16"}
  restored = pretrained.OrbaxParams(kept.directory, kept.number).restore(
      setup.trainer.abstract_state["params"])
  jax.tree.map(lambda r, p: np.testing.assert_array_equal(
      np.asarray(r), np.asarray(p.astype(jnp.bfloat16).astype(jnp.float32))), restored, params)
  assert all(r.dtype == jnp.float32 for r in jax.tree.leaves(restored))
