"""A real `python -m lima_jax.serve` process on 127.0.0.1 for the serving and chat tests."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from helpers import ROOT


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_device_env() -> dict:
  """The environment for a server or chat process: one CPU device (not the tests' 8 fakes)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


class Server:
  """Starts the server with `flags`, waits for /health; `stop` sends SIGTERM and waits."""

  def __init__(self, *flags, api_key: str = "", timeout: float = 300):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.api_key = api_key
    args = [sys.executable, "-m", "lima_jax.serve", *flags, f"--port={self.port}"]
    if api_key:
      args.append(f"--api_key={api_key}")
    self.proc = subprocess.Popen(args, cwd=ROOT, env=one_device_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
      try:
        if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      if time.monotonic() > deadline:
        self.stop()
        raise RuntimeError("server did not come up")
      time.sleep(0.5)

  def client(self, **kwargs):
    import openai  # pylint: disable=import-outside-toplevel
    return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                         max_retries=0, timeout=300, **kwargs)

  def async_client(self, **kwargs):
    import openai  # pylint: disable=import-outside-toplevel
    return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none",
                              max_retries=0, timeout=300, **kwargs)

  def stop(self, timeout: float = 120) -> str:
    """SIGTERM, then the process's output once it has exited."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    try:
      out, _ = self.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      out, _ = self.proc.communicate()
    return out


def tiny_run(workdir: str) -> str:
  """A toy run of three steps (d_model 64, 2 layers, context 128, the sample sentencepiece
  tokenizer with LIMA's new EOT row): what `--workdir` serves in these tests."""
  from lima_jax import config, train  # pylint: disable=import-outside-toplevel
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.data.max_length = 128
  cfg.train.batch_size, cfg.train.epochs = 32, 1
  cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_dim = 64, 2, 128
  cfg.optimizer.warmup_steps = 0
  cfg.eval.generate_epochs = ()
  train.run(cfg, workdir)
  return workdir


def forward_logprobs(trainer, params):
  """Our forward in this process, as a reference for the server's logprobs: ids (a list of
  ints) -> log-softmax [len, vocab] (numpy fp32) of the model's logits at each position."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  constrain = sharding.Constrainer(trainer.mesh)

  @jax.jit
  def logprobs(params, ids):
    positions = jnp.arange(ids.shape[1])[None]
    logits = trainer.model(params)(ids, positions, jnp.ones_like(ids), constrain=constrain)
    return jax.nn.log_softmax(logits, axis=-1)

  return lambda ids: np.asarray(logprobs(params, jnp.asarray([ids], jnp.int32)))[0]
