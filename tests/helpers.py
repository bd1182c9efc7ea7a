"""Shared by the tests that look into a run's workdir."""

import hashlib
import os
import subprocess
import sys

import jax

from lima_jax import checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_params(cfg, workdir):
  """Params of the newest checkpoint in `workdir`, as host arrays."""
  setup = train.prepare(cfg, workdir)
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"))
  try:
    state = ckpts.restore(ckpts.latest_step(), setup.trainer.abstract_state)
  finally:
    ckpts.close()
  return jax.device_get(state["params"])


def tree_hashes(directory):
  """{relative path: sha256} of every file under `directory`."""
  hashes = {}
  for base, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        hashes[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return hashes


def train_cli(*args, **popen_kwargs):
  """`python -m lima_jax.train ARGS` started in the repository root."""
  return subprocess.Popen([sys.executable, "-m", "lima_jax.train", *args], cwd=ROOT,
                          **popen_kwargs)
