"""The whole run's wall time, not just its steps: what `lima_jax.plan` prints beside the compute.

A pod run pays for more than its train steps. This module adds up, in seconds of wall time:

  weights_load  the source weights read from storage, every host reading its share at once (with
                LoRA the frozen base: the adapters start fresh)
  compile       the train step, eval step and decode loop (the plan measures the XLA:CPU compile)
  steps         the train steps at the planned MFU (the planner's compute time)
  epoch_end     dev loss (a forward pass over the dev set at the same MFU) every epoch, and dev
                generations at each epoch of eval.generate_epochs: decode steps bound by HBM
                bandwidth (each chip reads its share of the weights and of the KV cache)
  checkpoint    the part of checkpoint writes that the step loop waits for (below)

Checkpoints follow `lima_jax.loop` and `lima_jax.checkpoint` step by step along the run's
timeline: at each epoch end, the selection epochs' params export (`checkpoint.export_dtype`) is
queued before the dev generations; then the full train state, when due
(`checkpoint.epoch_state`: `always`, `when_idle` = only if no write is in progress, exports
included, `never`), at interval steps / minutes, and at the last step, after which the run waits
for every write. Each save blocks for its device-to-host copy, for the previous save of its
kind (Orbax writes one at a time per directory), and for host memory when the bytes in flight
would exceed the host's RAM; the rest is written in the background, in order, at the host's
write bandwidth, while the next steps run. Without `checkpoint.async_save` a save blocks for
its whole write. With LoRA a checkpoint holds what trains (the adapters and a new EOT's rows,
`lima_jax.trained`), its optimizer state and the step, and an export what trains alone
(`Trainer.checkpointed`): small next to the full state; a
resumed run reads the base again, as at the start (not modelled here: the plan has no
preemptions).

All bandwidths are bytes per second; `Assumptions` documents each default and its source.
"""

import dataclasses

import jax
import numpy as np

from lima_jax.decoding import decode_weights

GB = 10**9


@dataclasses.dataclass(frozen=True)
class Assumptions:
  """What the model cannot know; `lima_jax.plan` exposes each as a flag.

  read_Bps, write_Bps: per host, to and from the checkpoint bucket. Defaults 2 GB/s and 1 GB/s:
  our cautious reading, not a measurement. A v5p host's data-center network is 4 x 50 Gbps =
  25 GB/s (Cloud TPU v5p docs) and Cloud Storage's default regional bandwidth quota is 200 Gbps
  per project, shared by all hosts; single-VM transfers usually reach a fraction of that.
  Measure yours (`gcloud storage cp` of a few GB from a TPU VM) and pass it.
  d2h_Bps: device-to-host copy per chip, the blocking part of an asynchronous save: 32 GB/s,
  the PCIe figure Orbax's performance guide gives for a TPU.
  source_bytes_per_param: the pretrained weights' format, 2 (bf16/fp16 safetensors, as LLaMA is
  released); 0 for a run from random init.
  dev_prompts: LIMA's development set, 50 examples (the paper's table 1); 0 for a run without.
  dev_tokens: mean tokens of a dev example, for the dev loss (the training set's mean, 750).
  prompt_tokens: the padded prompt length of a generation batch: LIMA's dev prompts are short
  questions, and a batch pads its longest prompt to a power of two (lima_jax.decoding).
  """
  read_Bps: float = 2 * GB
  write_Bps: float = 1 * GB
  d2h_Bps: float = 32 * GB
  source_bytes_per_param: float = 2.0
  dev_prompts: int = 50
  dev_tokens: int = 750
  prompt_tokens: int = 128


@dataclasses.dataclass(frozen=True)
class Policy:
  """The checkpoint settings of a run (the `checkpoint` config section)."""
  epoch_state: str = "when_idle"
  every_steps: int = 0
  every_minutes: float = 0.0
  async_save: bool = True
  export_epochs: tuple = ()  # epochs whose params are exported (eval.generate_epochs in range)

  @classmethod
  def from_config(cls, cfg) -> "Policy":
    c = cfg.checkpoint
    return cls(c.epoch_state, c.every_steps, c.every_minutes, c.async_save,
               tuple(e for e in cfg.eval.generate_epochs if e <= cfg.train.epochs))


@dataclasses.dataclass(frozen=True)
class Run:
  """The run's shape, sizes and speeds, from the planner. Bytes are whole-slice totals."""
  hosts: int
  devices: int
  host_memory: int  # bytes of RAM per host
  hbm_Bps: float  # per device
  steps_per_epoch: int
  epochs: int
  step_s: float
  compile_s: float
  params: int  # read from the source at start-up: with LoRA the frozen base (adapters start fresh)
  full_state_bytes: int  # what a checkpoint holds: params (with LoRA the adapters), optimizer, step
  export_bytes: int  # an epoch's params export in checkpoint.export_dtype (with LoRA the adapters)
  dev_loss_flops: float  # one pass of the dev set's forward
  flops_per_s: float  # the slice's peak FLOP/s times the planned MFU
  decode_weight_bytes: int  # what one decode step reads of the weights, whole slice
  kv_bytes_per_slot: int  # K and V of one token of one row, all layers
  generate_batch: int  # rows per generation batch
  generate_batches: int  # batches per dev generation pass
  decode_steps: int  # decode steps per batch (the loop's bound: it stops when every row ends)


def decode_step_s(run: Run, prompt_tokens: int) -> float:
  """One decode step's HBM reads over the bandwidth: each device reads its share of the weights
  and of its rows' KV cache (all of the cache's slots: the attention runs over the static
  buffer). This assumes the weights stay in place and activations move (tiny at decode); if
  XLA gathered whole weights to every device instead, decoding would be up to `devices` times
  slower."""
  slots = prompt_tokens + run.decode_steps
  cache = run.kv_bytes_per_slot * run.generate_batch * slots
  return (run.decode_weight_bytes + cache) / run.devices / run.hbm_Bps


def epoch_end_s(run: Run, a: Assumptions, policy: Policy) -> tuple[float, float]:
  """(dev loss seconds per epoch, dev generation seconds per generating epoch)."""
  dev_loss = run.dev_loss_flops / run.flops_per_s if a.dev_prompts else 0.0
  generations = (run.generate_batches * run.decode_steps * decode_step_s(run, a.prompt_tokens)
                 if a.dev_prompts and policy.export_epochs else 0.0)
  return dev_loss, generations


class _Host:
  """One host's background writes: in order, at the write bandwidth, each holding its bytes in
  host memory until written."""

  def __init__(self, run: Run, a: Assumptions):
    self.write_Bps, self.memory = a.write_Bps, run.host_memory
    self.copy_Bps = a.d2h_Bps * run.devices / run.hosts
    self.free_at = 0.0
    self.writes = []  # (finish time, bytes) of every write started
    self.last = {}  # kind -> finish time of its newest write

  def in_flight(self, t: float) -> int:
    return sum(b for end, b in self.writes if end > t)

  def save(self, t: float, kind: str, nbytes: float, async_save: bool) -> float:
    """Starts a save at time t; returns the seconds the step loop waits for it."""
    start = max(t, self.last.get(kind, 0.0))  # Orbax: one save at a time per directory
    if async_save and nbytes <= self.memory:
      for end in sorted(end for end, _ in self.writes if end > start):  # room in host memory
        if self.in_flight(start) + nbytes <= self.memory:
          break
        start = end
      start += nbytes / self.copy_Bps
      end = max(start, self.free_at) + nbytes / self.write_Bps
      resume = start
    else:
      end = max(start, self.free_at) + nbytes / self.write_Bps
      resume = end
    self.free_at = self.last[kind] = end
    self.writes.append((end, nbytes))
    return resume - t


def simulate(run: Run, a: Assumptions, policy: Policy) -> dict:
  """Walks the run's steps, epoch-end work and saves in the step loop's order; returns the
  seconds of each part and the saves made."""
  host = _Host(run, a)
  share = 1 / run.hosts
  dev_loss_s, generations_s = epoch_end_s(run, a, policy)
  load_s = run.params * a.source_bytes_per_param / (run.hosts * a.read_Bps)
  t = load_s + run.compile_s
  blocked = epoch_end = 0.0
  saves = {"full_state": 0, "params_export": 0}
  last_save = t
  total = run.steps_per_epoch * run.epochs
  for done in range(1, total + 1):
    t += run.step_s
    epoch_done = done % run.steps_per_epoch == 0
    epoch = done // run.steps_per_epoch
    if epoch_done:
      work = dev_loss_s
      if epoch in policy.export_epochs:
        wait = host.save(t, "export", run.export_bytes * share, policy.async_save)
        saves["params_export"] += 1
        blocked, t = blocked + wait, t + wait
        work += generations_s
      epoch_end, t = epoch_end + work, t + work
    last = done == total
    by_interval = ((policy.every_steps and done % policy.every_steps == 0) or
                   (policy.every_minutes and t - last_save >= 60 * policy.every_minutes))
    due = last or by_interval or (epoch_done and (
        policy.epoch_state == "always" or
        (policy.epoch_state == "when_idle" and host.free_at <= t)))
    if due:
      wait = host.save(t, "state", run.full_state_bytes * share, policy.async_save)
      saves["full_state"] += 1
      blocked, t, last_save = blocked + wait, t + wait, t + wait
  blocked += max(0.0, host.free_at - t)  # the run ends when every write is on storage
  return {"weights_load_s": load_s, "compile_s": run.compile_s,
          "steps_s": run.step_s * total, "epoch_end_s": epoch_end, "checkpoint_s": blocked,
          "saves": saves, "dev_loss_s_per_epoch": dev_loss_s,
          "generations_s_per_epoch": generations_s,
          "decode_step_s": decode_step_s(run, a.prompt_tokens) if a.dev_prompts else 0.0}


def wall_time(run: Run, a: Assumptions, policy: Policy) -> dict:
  """{'wall_time': {weights_load_s, compile_s, steps_s, epoch_end_s, checkpoint_s, total_s,
  non_compute_share}, 'checkpoint_bytes': {full_state, params_export}, 'load_bytes': the
  weights read at start-up, 'wall_time_detail': saves made and the epoch-end parts}."""
  sim = simulate(run, a, policy)
  parts = {k: sim[k] for k in ("weights_load_s", "compile_s", "steps_s", "epoch_end_s",
                               "checkpoint_s")}
  total = sum(parts.values())
  return {
      "wall_time": dict(parts, total_s=total,
                        non_compute_share=(total - parts["steps_s"]) / total if total else 0.0),
      "checkpoint_bytes": {"full_state": run.full_state_bytes, "params_export": run.export_bytes},
      "load_bytes": run.params * a.source_bytes_per_param,
      "wall_time_detail": {k: sim[k] for k in ("saves", "dev_loss_s_per_epoch",
                                               "generations_s_per_epoch", "decode_step_s")},
  }


def _nbytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def run_of_plan(cfg, topo, trainer, *, steps_per_epoch: int, step_s: float, flops_per_s: float,
                compile_s: float, dev_loss_flops: float, batch_ways: int, a: Assumptions) -> Run:
  """The `Run` of a planned training run: sizes from the trainer's abstract state, as the run
  writes them (`Trainer.checkpointed`; with LoRA an export holds the adapters alone) and reads
  them (with LoRA the frozen base, which a resumed run reads again before its checkpoint)."""
  state = trainer.abstract_state
  trained = trainer.num_trainable
  m = trainer.model_cfg
  compute = np.dtype(m.compute_dtype)
  decode_bytes = _nbytes(jax.eval_shape(lambda p: decode_weights(p, compute), state["params"]))
  rows = -(-cfg.generate.batch_size // batch_ways) * batch_ways
  return Run(
      hosts=topo.hosts, devices=topo.devices, host_memory=topo.host_memory,
      hbm_Bps=topo.hbm_bandwidth, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs,
      step_s=step_s, compile_s=compile_s,
      params=trainer.num_params - (trained if trainer.uses_lora else 0),
      full_state_bytes=_nbytes(trainer.checkpointed(state)),
      export_bytes=trained * np.dtype(cfg.checkpoint.export_dtype).itemsize,
      dev_loss_flops=dev_loss_flops, flops_per_s=flops_per_s,
      decode_weight_bytes=decode_bytes,
      kv_bytes_per_slot=2 * m.n_layers * m.n_kv_heads * m.head_dim * compute.itemsize,
      generate_batch=rows, generate_batches=-(-a.dev_prompts // rows),
      decode_steps=max(1, min(cfg.eval.max_new_tokens, cfg.data.max_length - 1)))
