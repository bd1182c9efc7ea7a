"""The step loop: train steps, end-of-epoch work, and the checkpoints that make a run resumable.

A checkpoint is written at the end of every epoch, every `checkpoint.every_steps` steps and/or
`checkpoint.every_minutes` minutes (only the newest of these interval checkpoints is kept), at
`train.stop_after_steps`, and when SIGTERM (the spot preemption notice) or Ctrl-C arrives: the
step in flight finishes, its checkpoint is written, and the run ends cleanly. Since the data
order, dropout and LR all follow from the step, rerunning the same command resumes exactly.
"""

import dataclasses
import math
import os
import signal
import sys
import threading
import time

import jax

from lima_jax.errors import LimaError

# Checkpoint metadata: the epoch's train loss so far, [token-weighted loss sum, token count].
EPOCH_LOSS = "epoch_loss_so_far"


class StopRequest:
  """Catches SIGTERM and SIGINT while training; a second Ctrl-C ends the process at once.

  At once means as a kill would: a checkpoint write in flight is abandoned (the checkpoints before
  it are intact, see checkpoint.py), and one line on stderr names the newest complete checkpoint
  (`saved()` says it). Once a signal has come, the handler stays until the process exits, so a
  second Ctrl-C while the run winds down (finishing a checkpoint, closing files) ends it the same
  way instead of raising KeyboardInterrupt inside a library.
  """

  def __init__(self, saved):
    self.signal_name = None
    self._saved = saved
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_name and signum == signal.SIGINT:
      try:
        saved = self._saved()
      except Exception:  # pylint: disable=broad-except  # interrupted mid-call into Orbax
        saved = "rerun the same command to resume from the newest checkpoint"
      print(f"\nlima_jax: interrupted at once by a second Ctrl-C; {saved}", file=sys.stderr,
            flush=True)
      os._exit(130)  # the shell's status for SIGINT
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def __exit__(self, *exc):
    if self.signal_name is None:
      for signum, handler in self._previous.items():
        signal.signal(signum, handler)


@dataclasses.dataclass
class Cadence:
  """When an interval checkpoint is due, by steps and/or wall-clock minutes (0 = off)."""
  every_steps: int
  every_minutes: float
  last_save: float = dataclasses.field(default_factory=time.monotonic)

  def due(self, step: int) -> bool:
    by_steps = self.every_steps > 0 and step % self.every_steps == 0
    by_time = (self.every_minutes > 0 and
               time.monotonic() - self.last_save >= 60 * self.every_minutes)
    return by_steps or by_time

  def saved(self) -> None:
    self.last_save = time.monotonic()


@dataclasses.dataclass
class Outcome:
  last: dict  # the last step's metrics
  stopped_by: str | None  # the signal that stopped the run early, if any


def train_steps(setup, cfg, state, steps: range, ckpts, reporter,
                epoch_loss: tuple[float, float] = (0.0, 0.0)) -> Outcome:
  """Runs `steps` (global step numbers) from `state`; see the module docstring.

  `epoch_loss` is the token-weighted loss sum and token count of the steps of the current epoch
  before `steps.start` (a resumed run's checkpoint carries them as EPOCH_LOSS), so an epoch's
  train loss covers all its steps however often the run was interrupted.
  """
  cadence = Cadence(cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes)
  bad_steps = 0
  record, epoch_loss = {}, list(epoch_loss)
  with StopRequest(lambda: _newest_checkpoint(ckpts)) as stop:
    for step in steps:
      state, record = _one_step(setup, state, step)
      reporter.step(record)
      if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
        bad_steps += 1
        _refuse_bad_step(record, bad_steps, cfg.train.max_bad_steps, ckpts)
        reporter.message(f"step {step + 1}: non-finite loss or gradient, update skipped "
                         f"({bad_steps}/{cfg.train.max_bad_steps} allowed)")
      else:
        epoch_loss = [epoch_loss[0] + record["loss"] * record["tokens"],
                      epoch_loss[1] + record["tokens"]]
      done = step + 1
      epoch_done = done % setup.plan.steps_per_epoch == 0
      if epoch_done:
        _end_of_epoch(setup, state, done, epoch_loss, reporter)
        epoch_loss = [0.0, 0.0]
      last = done == steps.stop
      if epoch_done or last or stop.signal_name or cadence.due(done):
        ckpts.save(done, state, dict(setup.meta, step=done,
                                     epoch=done / setup.plan.steps_per_epoch,
                                     **{EPOCH_LOSS: epoch_loss}),
                   interval=not (epoch_done or last))
        cadence.saved()
      if stop.signal_name:
        reporter.message(f"{stop.signal_name}: checkpoint of step {done} written; stopping. "
                         "Rerun the same command to resume.")
        return Outcome(record, stop.signal_name)
  return Outcome(record, None)


def _newest_checkpoint(ckpts) -> str:
  step = ckpts.newest_complete_step()
  if step is None:
    return f"no checkpoint in {ckpts.directory} yet: rerun the same command to start afresh"
  return (f"the newest checkpoint is step {step} in {ckpts.directory}: rerun the same command "
          "to resume from it")


def _one_step(setup, state, step) -> tuple[dict, dict]:
  batch = setup.layout.pack([setup.examples[i] for i in setup.plan.example_ids(step)])
  t0 = time.perf_counter()
  state, metrics = setup.trainer.train_step(state, setup.trainer.put_batch(batch))
  metrics = jax.device_get(metrics)
  step_time = time.perf_counter() - t0
  tokens = int(metrics["tokens"])
  return state, {"step": step + 1, "epoch": setup.plan.epoch_of(step) + 1,
          "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
          "grad_norm": float(metrics["grad_norm"]), "tokens": tokens, "step_time": step_time,
          "tokens_per_s": tokens / step_time}


def _end_of_epoch(setup, state, step, epoch_loss, reporter) -> None:
  epoch = step // setup.plan.steps_per_epoch
  summary = {"loss": epoch_loss[0] / max(epoch_loss[1], 1)}
  if setup.dev is not None:
    summary.update({f"dev_{k}": v
                    for k, v in setup.dev.evaluate(setup.trainer, state["params"]).items()})
  reporter.epoch(epoch, summary, step)
  setup.generations.at_epoch_end(epoch, step, state["params"])


def _refuse_bad_step(record, bad_steps, allowed, ckpts) -> None:
  if bad_steps <= allowed:
    return
  ckpts.wait()
  last_good = ckpts.latest_step()
  kept = f"the last good checkpoint is step {last_good}" if last_good else "no checkpoint yet"
  raise LimaError(f"step {record['step']}: non-finite loss ({record['loss']}) or gradient norm "
                  f"({record['grad_norm']}); {kept}. Lower optimizer.learning_rate, set "
                  f"optimizer.grad_clip_norm, or allow skipping with train.max_bad_steps")
