"""Two processes of 4 fake CPU devices each form one 8-device mesh and train like one process.

The workers are this file run as a script: `python test_multihost.py PROCESS_ID PORT WORKDIR`.
"""

import json
import os
import re
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  from lima_jax import config  # pylint: disable=import-outside-toplevel
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.data.max_length = 128
  cfg.train.batch_size = 8
  cfg.train.epochs = 1  # 9 steps of the 71 sample conversations, then the dev set
  cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_dim = 64, 2, 128
  cfg.eval.generate_epochs = ()
  cfg.optimizer.warmup_steps = 2  # of 9 steps
  cfg.checkpoint.async_save = False
  return cfg


def worker(process_id: int, port: int, workdir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  from lima_jax import train  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  cfg.mesh.cpu_devices = 4  # per process
  train.run(cfg, workdir)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_end_with_the_params_of_one(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from helpers import final_params  # pylint: disable=import-outside-toplevel
  from lima_jax import train  # pylint: disable=import-outside-toplevel

  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  # The test process's 8-device flag would give each worker 8 devices.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  port = _free_port()
  workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), multi], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  try:
    cfg = tiny_config()
    train.run(cfg, single)  # the reference, on this process's 8 devices, meanwhile
    outputs = [w.communicate(timeout=300)[0] for w in workers]
  finally:
    for w in workers:
      w.kill()
  for i, (w, out) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, f"worker {i} failed:\n{out[-4000:]}"

  losses = {}
  for run in (multi, single):
    with open(os.path.join(run, "metrics.jsonl")) as f:
      losses[run] = [json.loads(line)["loss"] for line in f]
  assert len(losses[multi]) == 9  # process 0 alone writes metrics
  with open(os.path.join(multi, "run.lock"), encoding="utf-8") as f:
    # One lock per run, taken by process 0: had each process locked, process 1 would have been
    # refused the workdir process 0 holds.
    assert json.load(f)["pid"] == workers[0].pid
  # Cross-process all-reduces (gloo) sum in another order than in-process ones: equal up to
  # float rounding, far below what one misplaced row of data would change.
  np.testing.assert_allclose(losses[multi], losses[single], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               final_params(cfg, multi), final_params(cfg, single))

if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
