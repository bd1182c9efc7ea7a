"""One-shot GPU benchmark: train-step MFU, tokens/s against PyTorch, decode speed, step-loop gaps.

  python bench/gpu.py             # on an H100/H200-class GPU: one JSON object, in a few minutes
  python bench/gpu.py --dry-run   # the same at toy size on the CPU (what CI runs)

The model is a LLaMA of about 1B parameters (d 2048, 18 layers, 16 heads, FFN 5632, vocabulary
32,001), fp32 params, bf16 compute, cuDNN attention, LIMA's residual dropout (0.2 at the top),
AdamW, trained by the project's own `Trainer` on 8 packed rows of 2,048 tokens per step. The
figures:

- `mfu`: model FLOPs per second of the train step (bench/flops.py's count) over the GPU's dense
  bf16 peak from NVIDIA's datasheet (H100/H200 SXM 989 TFLOP/s); `mfu_vs_matmul`: over a bf16
  matmul timed in the same process;
- `vs_pytorch`: our tokens/s over transformers' `LlamaForCausalLM` (SDPA attention, fp32 weights
  under bf16 autocast, `torch.optim.AdamW`) on the same GPU, shape and batch;
- `decode_tokens_per_s`: the generation loop (`lima_jax.decoding.Generator`, KV cache) at batch 1
  and 16, 128-token prompts, 256 new tokens;
- `between_steps_share`: the share of the step loop's wall time in which the GPU waits for the
  host, with `lima_jax.loop.pipelined_steps` packing and sending LIMA-length examples as
  training does (and `between_steps_share_synchronous` for a loop that packs, sends, runs and
  reads each step in turn, as the loop did before).

Runs where tensorflow-datasets, ml-collections and tensorboardX are not installed: it imports
no module that needs them (tests/test_bench.py runs the dry run with them blocked).
"""

import argparse
import json
import os
import sys
import time
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]  # bench/ and the repository: nothing installed

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from common import median, synthetic_batch, timed
from flops import train_flops
from packing_efficiency import lima_lengths
from lima_jax import data, loop, optim, sharding
from lima_jax.decoding import Decoding, Generator
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer

SIZES = {
    "gpu": dict(d_model=2048, n_layers=18, n_heads=16, ffn_dim=5632, vocab=32_001, rows=8,
                length=2048, rounds=10, loop_steps=20, prompt=128, new=256),
    "dry": dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=128, vocab=257, rows=2, length=128,
                rounds=2, loop_steps=4, prompt=8, new=8),
}
# Dense bf16 FLOP/s without sparsity, NVIDIA's datasheets, by a piece of jax's device_kind.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12))
LIMA_OPTIMIZER = types.SimpleNamespace(learning_rate=1e-5, end_learning_rate=1e-6, warmup_steps=0,
                                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                       grad_clip_norm=0.0)


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((peak for name, peak in PEAK_BF16 if name in kind), None)


def bf16_matmul_peak(n: int) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  dot = jax.jit(jnp.dot)
  timed(dot, a, a)
  return 2 * n ** 3 / min(timed(dot, a, a)[0] for _ in range(5))


def make_trainer(size: dict, gpu: bool, steps: int) -> Trainer:
  cfg = LlamaConfig(vocab_size=size["vocab"], d_model=size["d_model"], n_layers=size["n_layers"],
                    n_heads=size["n_heads"], n_kv_heads=size["n_heads"], ffn_dim=size["ffn_dim"],
                    residual_dropout_top=0.2, compute_dtype="bfloat16",
                    attention="cudnn" if gpu else "xla")
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  optimizer, schedule = optim.make_optimizer(LIMA_OPTIMIZER, steps)
  return Trainer(cfg, optimizer, schedule, mesh, 0)


def train_step_figures(trainer: Trainer, size: dict, host_batch: dict, peak) -> tuple:
  """(figures, state after the timed steps): compile, step time and MFU of the real step."""
  batch = trainer.put_batch(host_batch)
  state = trainer.init(0)
  started = time.perf_counter()
  state, metrics = trainer.train_step(state, batch)  # compiles
  jax.block_until_ready(metrics)
  first = time.perf_counter() - started
  seconds = []
  for _ in range(size["rounds"]):
    step_s, (state, metrics) = timed(trainer.train_step, state, batch)
    seconds.append(step_s)
  flops = train_flops(trainer.model_cfg, size["rows"], size["length"])
  step_s = median(seconds)
  return {"params": trainer.num_params, "first_step_with_compile_s": first, "step_s": seconds,
          "model_flops_per_step": flops, "tokens_per_s": size["rows"] * size["length"] / step_s,
          "mfu": flops / step_s / peak if peak else None,
          "loss": float(metrics["loss"])}, state


def loop_figures(trainer: Trainer, size: dict, state, device_step_s: float) -> dict:
  """Wall time of the real step loop over LIMA-length examples against the device's time."""
  rows, length = size["rows"], size["length"]
  lengths = np.minimum(lima_lengths(count=rows * size["loop_steps"], cap=length), length)
  rng = np.random.default_rng(0)
  examples = [data.Example(rng.integers(0, size["vocab"], n).astype(np.int32),
                           np.ones(n, np.float32)) for n in lengths]
  # One example per row at most, so every step fits the timed step's [1, rows, length] shape.
  setup = types.SimpleNamespace(trainer=trainer, examples=examples,
                                plan=data.EpochPlan(len(examples), rows, 0),
                                layout=data.StepLayout(1, rows, length))
  steps = range(size["loop_steps"])
  started = time.perf_counter()
  for held, record in loop.pipelined_steps(setup, state, steps, lambda done: False):
    del held
  pipelined = time.perf_counter() - started
  state = trainer.init(1)
  started = time.perf_counter()
  for step in steps:  # pack, send, run, read: one after the other
    batch = trainer.put_batch(setup.layout.pack([examples[i]
                                                 for i in setup.plan.example_ids(step)]))
    state, metrics = trainer.train_step(state, batch)
    jax.device_get(metrics)
  synchronous = time.perf_counter() - started
  busy = device_step_s * len(steps)
  return {"between_steps_share": max(0.0, 1 - busy / pipelined),
          "between_steps_share_synchronous": max(0.0, 1 - busy / synchronous),
          "loop_s": pipelined, "loop_s_synchronous": synchronous, "loop_steps": len(steps),
          "last_loss": record["loss"]}


def decode_figures(trainer: Trainer, size: dict, params) -> dict:
  rng = np.random.default_rng(1)
  out = {}
  for batch in (1, 16):
    # The EOT id is a vocabulary-padding id, never sampled: every row runs all `new` tokens.
    generator = Generator(trainer, stop_ids=trainer.model_cfg.vocab_size, batch_size=batch)
    prompts = [rng.integers(0, size["vocab"] - 1, size["prompt"]).astype(np.int32)
               for _ in range(batch)]
    kwargs = dict(max_new=size["new"], context=size["prompt"] + size["new"] + 1,
                  decoding=Decoding(greedy=True))
    generator.generate(params, prompts, **kwargs)  # compiles
    started = time.perf_counter()
    ids = generator.generate(params, prompts, **kwargs)
    seconds = time.perf_counter() - started
    out[str(batch)] = sum(len(i) for i in ids) / seconds
  return out


def torch_figures(trainer: Trainer, size: dict, host_batch: dict, gpu: bool) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from throughput import TorchReference  # pylint: disable=import-outside-toplevel
  ref = TorchReference(trainer.model_cfg, LIMA_OPTIMIZER, host_batch,
                       device="cuda" if gpu else "cpu", autocast=torch.bfloat16 if gpu else None)
  ref.step()  # first step: allocation, kernel selection
  seconds = []
  for _ in range(size["rounds"]):
    started = time.perf_counter()
    ref.step()  # returns the loss as a float: waits for the GPU
    seconds.append(time.perf_counter() - started)
  step_s = median(seconds)
  out = {"step_s": seconds, "tokens_per_s": size["rows"] * size["length"] / step_s,
         "torch": torch.__version__}
  del ref
  if gpu:
    torch.cuda.empty_cache()
  return out


def run(dry_run: bool) -> dict:
  started = time.perf_counter()
  device = jax.devices()[0]
  gpu = device.platform == "gpu"
  if not (gpu or dry_run):
    raise SystemExit(f"error: no GPU here (JAX sees {device.platform}); use --dry-run on a CPU")
  size = SIZES["gpu" if gpu and not dry_run else "dry"]
  trainer = make_trainer(size, gpu, steps=1000)
  host_batch = synthetic_batch(size["rows"], size["length"], size["vocab"])
  peak = peak_flops(device)
  torch_ = torch_figures(trainer, size, host_batch, gpu)  # first: its memory is freed after
  train, state = train_step_figures(trainer, size, host_batch, peak)
  matmul = bf16_matmul_peak(8192 if gpu else 256)
  step_s = median(train["step_s"])
  loop_ = loop_figures(trainer, size, state, step_s)
  decode = decode_figures(trainer, size, trainer.init(2)["params"])
  return {
      "device": getattr(device, "device_kind", device.platform), "dry_run": dry_run,
      "jax": jax.__version__, "peak_bf16_flops": peak, "matmul_bf16_flops": matmul,
      "mfu": train["mfu"], "mfu_vs_matmul": train["model_flops_per_step"] / step_s / matmul,
      "vs_pytorch": train["tokens_per_s"] / torch_["tokens_per_s"],
      "tokens_per_s": {"jax": train["tokens_per_s"], "pytorch": torch_["tokens_per_s"]},
      "decode_tokens_per_s": decode,
      "between_steps_share": loop_["between_steps_share"],
      "between_steps_share_synchronous": loop_["between_steps_share_synchronous"],
      "train": train, "pytorch": torch_, "loop": loop_,
      "shape": {k: size[k] for k in ("d_model", "n_layers", "n_heads", "ffn_dim", "vocab", "rows",
                                     "length")},
      "elapsed_s": time.perf_counter() - started,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="toy size on the CPU: builds and compiles every part, for CI")
  args = parser.parse_args()
  print(json.dumps(run(args.dry_run)), flush=True)


if __name__ == "__main__":
  main()
