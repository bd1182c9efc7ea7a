"""What the benchmarks share: the machine's matmul peak, timing, the benchmark model and batch,
and running a measurement in a fresh process with a given number of CPU devices.

Figures are ratios measured inside one run: on a shared machine absolute times drift by 2-3x
from minute to minute, so a step is compared with a matmul timed next to it.
"""

import json
import os
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
SAMPLE_VOCAB = 1001  # the shipped sample tokenizer's vocabulary with EOT (padded to 1024)


def median(values) -> float:
  return float(statistics.median(values))


def mfu(flops: float, step_seconds, peaks) -> float:
  """Median over rounds of model FLOP/s over the matmul peak timed in the same round."""
  return median(flops / s / p for s, p in zip(step_seconds, peaks))


def timed(fn, *args):
  """(seconds, result) of fn(*args), waiting for every array in the result."""
  import jax  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def matmul_peak(sizes=(1024, 2048), repeats: int = 3) -> float:
  """Dense fp32 matmul FLOP/s of this process: the best of `repeats` at each square size."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  best = 0.0
  dot = jax.jit(jnp.dot)
  for n in sizes:
    a = jax.random.normal(jax.random.key(n), (n, n), jnp.float32)
    timed(dot, a, a)  # compile
    seconds = min(timed(dot, a, a)[0] for _ in range(repeats))
    best = max(best, 2 * n ** 3 / seconds)
  return best


def model_setup(n_layers=8, d_model=512, n_heads=8, ffn_dim=1408, dropout=None,
                scan_layers=True):
  """(config, LlamaConfig): LIMA's base config with the benchmark's model shape, fp32."""
  from lima_jax import config  # pylint: disable=import-outside-toplevel
  from lima_jax.train import model_config  # pylint: disable=import-outside-toplevel
  cfg = config.base_config()
  m = cfg.model
  m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.ffn_dim = (n_layers, d_model, n_heads,
                                                                n_heads, ffn_dim)
  m.compute_dtype = "float32"
  m.scan_layers = scan_layers
  if dropout is not None:
    m.residual_dropout_top = dropout
  return cfg, model_config(m, SAMPLE_VOCAB)


def make_trainer(cfg, model_cfg, mesh, total_steps: int = 1000):
  """The project's Trainer with its AdamW, as the training CLI builds it."""
  from lima_jax import optim  # pylint: disable=import-outside-toplevel
  from lima_jax.train_state import Trainer  # pylint: disable=import-outside-toplevel
  optimizer, schedule = optim.make_optimizer(cfg.optimizer, total_steps)
  return Trainer(model_cfg, optimizer, schedule, mesh, cfg.seed)


def synthetic_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
  """A step's batch as the trainer takes it, [1 micro-batch, rows, length], with one
  full-length example per row (every position a token)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((rows, length), np.float32),
           "segment_ids": np.ones((rows, length), np.int32),
           "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}
  return {k: v[None] for k, v in batch.items()}


def run_worker(name: str, devices: int, timeout: float, *args) -> dict:
  """Runs `bench/run.py --worker name` in a fresh process with `devices` CPU devices (the
  count is fixed when JAX starts) and returns the JSON object it prints last."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  started = time.perf_counter()
  done = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "run.py"), "--worker", name,
                         *map(str, args)], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False)
  if done.returncode:
    raise RuntimeError(f"bench worker {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
  out = json.loads(done.stdout.strip().splitlines()[-1])
  out["process_s"] = time.perf_counter() - started
  return out
