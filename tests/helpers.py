"""Shared by the tests that look into a run's workdir."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import jax

from lima_jax import checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_params(cfg, workdir):
  """Params of the newest checkpoint in `workdir` (with LoRA, the adapters it holds), as host
  arrays."""
  setup = train.prepare(cfg, workdir)
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"))
  try:
    state = ckpts.restore(ckpts.latest_step(),
                          setup.trainer.checkpointed(setup.trainer.abstract_state))
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


def tensorboard_steps(workdir, tag):
  """The steps TensorBoard shows for scalar `tag`: every event file of the run in the order
  written, a SessionLog START at step s hiding what earlier files logged from s on."""
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  folder = os.path.join(workdir, "tensorboard")
  shown = []
  for name in sorted(os.listdir(folder), key=lambda n: os.path.getmtime(os.path.join(folder, n))):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):  # TFRecord: length, its crc, the record, its crc
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        shown = [s for s in shown if s < event.step]
      shown += [event.step for v in event.summary.value if v.tag == tag]
  return shown


def checkpoint_write_in_progress(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt_dir) and any("tmp" in name for name in os.listdir(ckpt_dir))


def run_and_kill(flags, workdir, *, after_seconds=None, during_checkpoint_write=False):
  """Starts `python -m lima_jax.train FLAGS` and SIGKILLs it once it is stepping: after a
  delay, or as soon as a checkpoint is being written. Returns True if it was killed before
  finishing."""
  proc = train_cli(*flags, f"--workdir={workdir}", stdout=subprocess.PIPE,
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


def random_hf_llama(path, *, vocab, d=64, heads=4, kv=4, ffn=96, tied=False, theta=10_000.0,
                    seed=0):
  """A random 2-layer HF LLaMA saved as safetensors in `path`. Weights are larger than
  transformers' init and norms are not ones, so layout mistakes show in the logits."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=2,
      num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta, rms_norm_eps=1e-5,
      tie_word_embeddings=tied, max_position_embeddings=256)
  model = randomize(transformers.LlamaForCausalLM(cfg).eval())
  model.save_pretrained(path)
  return model


def randomize(model, qk_std=0.1):
  """`model`'s weights drawn larger than transformers' init (std 0.1; q/k `qk_std`) and its
  norm scales away from ones, so layout and rotary mistakes show in the logits."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0, qk_std if ("q_proj" in name or "k_proj" in name) else 0.1)
  return model
