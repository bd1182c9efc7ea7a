"""MFU of the train step against this process's matmul peak, and tokens/s against PyTorch.

The model: LLaMA with 8 layers, d 512, FFN 1408, 8 heads, 8 rows of 512 tokens, fp32, LIMA's
residual dropout (0.2 at the top layer) and AdamW, i.e. the real `Trainer.train_step`, its rows
in micro-batches of MICRO_ROWS (or of one row per batch shard, if that is more). Its layers run
as a Python loop (`model.scan_layers=False`, what a model this shallow should use); the scanned
stack, the default that keeps deep models' compile flat, is timed beside it. Each round times a
matmul peak and both JAX steps back to back, so machine load that drifts between rounds cancels
in each round's ratio; figures are medians. The PyTorch reference runs in its own process
against the same yardstick (`measure_torch`).
"""

import os

from common import (matmul_peak, median, make_trainer, mfu, model_setup, synthetic_batch,
                    timed)
from flops import train_flops

ROWS, LENGTH = 8, 512
# Rows per micro-batch (train.micro_batch_rows), at least one per batch shard. On this CPU two
# micro-batches of 4 rows run 1.2-1.3x faster than one of 8: the step's temporaries shrink from
# 3.3 to 1.8 GB, and XLA:CPU maps them anew each step (bench/README.md).
MICRO_ROWS = 4


class TorchReference:
  """transformers' LlamaForCausalLM (random init, SDPA attention) with torch AdamW on the
  same shape and hyper-parameters; its loss is the mean over every target, as ours is.

  fp32 weights; with `autocast` (e.g. torch.bfloat16) the forward and backward run in that
  dtype, as ours do with model.compute_dtype. `device`: 'cpu' or 'cuda'."""

  def __init__(self, model_cfg, opt_cfg, batch, *, device: str = "cpu", autocast=None):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    if device == "cpu":
      torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.d_model,
        intermediate_size=model_cfg.ffn_dim, num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads, num_key_value_heads=model_cfg.n_kv_heads,
        max_position_embeddings=batch["tokens"].shape[-1], rms_norm_eps=model_cfg.norm_eps,
        rope_theta=model_cfg.rope_theta, tie_word_embeddings=False)
    self.model = transformers.LlamaForCausalLM._from_config(  # pylint: disable=protected-access
        hf_cfg, attn_implementation="sdpa", dtype=torch.float32).to(device)
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=opt_cfg.learning_rate,
                                 betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps,
                                 weight_decay=opt_cfg.weight_decay)
    self.tokens = torch.from_numpy(batch["tokens"][0]).long().to(device)  # the one micro-batch
    self.targets = torch.from_numpy(batch["targets"][0]).long().to(device)
    self.torch, self.device, self.autocast = torch, device, autocast

  def step(self) -> float:
    """One optimizer step; returns its loss (reading it waits for the device)."""
    with self.torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
      logits = self.model(input_ids=self.tokens).logits
      loss = self.torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                    self.targets.flatten())
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())


class JaxStep:
  """One compiled `Trainer.train_step` and the state it carries from step to step."""

  def __init__(self, scan_layers: bool, host_batch: dict, mesh):
    import time  # pylint: disable=import-outside-toplevel
    from lima_jax import sharding  # pylint: disable=import-outside-toplevel
    cfg, self.model_cfg = model_setup(scan_layers=scan_layers)
    trainer = make_trainer(cfg, self.model_cfg, mesh)
    self.micro_rows = max(MICRO_ROWS, sharding.batch_ways(mesh))
    micro_batches = {k: v.reshape(-1, self.micro_rows, LENGTH) for k, v in host_batch.items()}
    self.state, self.batch = trainer.init(cfg.seed), trainer.put_batch(micro_batches)
    started = time.perf_counter()
    self.step = trainer.train_step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - started
    self.run()  # first run: allocation, caches

  def run(self) -> float:
    seconds, (self.state, _) = timed(self.step, self.state, self.batch)
    return seconds


def measure(rounds: int) -> dict:
  """The JAX steps. One process, all its devices on the default mesh (fsdp over every device)."""
  import jax  # pylint: disable=import-outside-toplevel
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  cfg, model_cfg = model_setup()
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  host_batch = synthetic_batch(ROWS, LENGTH, model_cfg.vocab_size)
  unrolled, scanned = JaxStep(False, host_batch, mesh), JaxStep(True, host_batch, mesh)
  flops = train_flops(model_cfg, ROWS, LENGTH)
  peaks, jax_s, scanned_s = [], [], []
  for _ in range(rounds):
    peaks.append(matmul_peak())
    jax_s.append(unrolled.run())
    scanned_s.append(scanned.run())
  return {"devices": len(jax.devices()), "mesh": dict(mesh.shape), "model_flops_per_step": flops,
          "micro_batch_rows": unrolled.micro_rows, "compile_s": unrolled.compile_s,
          "compile_s_scanned": scanned.compile_s, "step_s": jax_s, "step_s_scanned": scanned_s,
          "matmul_flops_per_s": peaks, "mfu_vs_matmul": mfu(flops, jax_s, peaks),
          "mfu_vs_matmul_scanned": mfu(flops, scanned_s, peaks),
          "scanned_step_time_vs_unrolled": median(s / u for s, u in zip(scanned_s, jax_s)),
          "tokens_per_s": ROWS * LENGTH / median(jax_s)}


def measure_torch(rounds: int) -> dict:
  """The PyTorch reference against the same JAX matmul yardstick, in a process of its own: a
  torch step slows the JAX steps that follow it in the same process (its threads and freed
  memory; 1.2-1.5x on this CPU), so the two are compared through their MFUs instead."""
  import time  # pylint: disable=import-outside-toplevel
  cfg, model_cfg = model_setup()
  torch_ref = TorchReference(model_cfg, cfg.optimizer,
                             synthetic_batch(ROWS, LENGTH, model_cfg.vocab_size))
  torch_ref.step()
  flops = train_flops(model_cfg, ROWS, LENGTH)
  peaks, torch_s = [], []
  for _ in range(rounds):
    peaks.append(matmul_peak())
    started = time.perf_counter()
    torch_ref.step()
    torch_s.append(time.perf_counter() - started)
  return {"step_s": torch_s, "matmul_flops_per_s": peaks,
          "mfu_vs_matmul": mfu(flops, torch_s, peaks),
          "tokens_per_s": ROWS * LENGTH / median(torch_s)}
