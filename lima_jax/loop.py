"""The step loop: train steps, end-of-epoch work, and the checkpoints that make a run resumable.

A checkpoint of the full train state is written at the end of an epoch (`checkpoint.epoch_state`:
by default only when no checkpoint or params export is still being written, so the steps never
wait for storage),
every `checkpoint.every_steps` steps and/or `checkpoint.every_minutes` minutes (only the newest
of these interval checkpoints is kept), at the last step and `train.stop_after_steps`, and when
SIGTERM (the spot preemption notice) or Ctrl-C arrives: the step in flight finishes, its
checkpoint is written, and the run ends cleanly. Since the data order, dropout and LR all
follow from the step, rerunning the same command resumes exactly.

The device is kept busy between steps: the next step's batch is packed and sent while the
current step runs, and, unless the loop needs the state after this step (an epoch end, a
checkpoint, a stop), the next step is dispatched before this step's metrics are read, so the
host's reading, logging and packing all overlap device work. A SIGTERM or a minutes-based
checkpoint that comes due while a step is queued behind another lands one step later.
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
  if steps.start == 0 and 0 in setup.generations.epochs:
    _end_of_epoch(setup, state, 0, None, reporter)  # epoch 0: the params training starts from
  with StopRequest(lambda: _newest_checkpoint(ckpts)) as stop:
    def hold(done):  # True: the loop needs the state after step `done`
      return (done % setup.plan.steps_per_epoch == 0 or done == steps.stop
              or bool(stop.signal_name) or cadence.due(done))

    for state, record in pipelined_steps(setup, state, steps, hold):
      reporter.step(record)
      if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
        bad_steps += 1
        _refuse_bad_step(record, bad_steps, cfg.train.max_bad_steps, ckpts)
        reporter.message(f"step {record['step']}: non-finite loss or gradient, update skipped "
                         f"({bad_steps}/{cfg.train.max_bad_steps} allowed)")
      else:
        epoch_loss = [epoch_loss[0] + record["loss"] * record["tokens"],
                      epoch_loss[1] + record["tokens"]]
      if state is None:  # the next step already runs on it: nothing to save here
        continue
      done = record["step"]
      epoch_done = done % setup.plan.steps_per_epoch == 0
      if epoch_done:
        _end_of_epoch(setup, state, done, epoch_loss, reporter)
        epoch_loss = [0.0, 0.0]
      last = done == steps.stop
      interval = bool(stop.signal_name) or cadence.due(done)
      state_due = epoch_done and epoch_state_due(cfg, ckpts, setup.generations)
      if last or interval or state_due:
        meta = dict(setup.meta, step=done, epoch=done / setup.plan.steps_per_epoch,
                    **{EPOCH_LOSS: epoch_loss})
        ckpts.save(done, setup.trainer.checkpointed(state), meta,
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


def epoch_state_due(cfg, ckpts, exports=None) -> bool:
  """Whether an epoch end writes the full train state (checkpoint.epoch_state). when_idle: only
  if storage is idle, the selection params `exports` (an EpochGenerations) included: those
  must be written, so a full state never competes with them for bandwidth."""
  policy = cfg.checkpoint.epoch_state
  busy = lambda: ckpts.writing() or (exports is not None and exports.writing())
  return policy == "always" or (policy == "when_idle" and not busy())


def pipelined_steps(setup, state, steps: range, hold):
  """Yields (state, record) for each step of `steps`, the device never idle between steps.

  `setup` provides trainer, layout, plan and examples. `hold(done)` is asked after step `done`
  is dispatched: True makes the loop wait, after reading the step's metrics, until the caller
  has used the state (the yielded state is the one after step `done`); False dispatches the
  next step first and yields None for the state (its buffers are donated to the next step).
  The next batch is packed and sent to the devices while the current step runs.
  """
  trainer = setup.trainer
  batches = {}

  def prepare(step):  # packs the step's batch and starts its transfer to the devices
    if step not in batches:
      examples = [setup.examples[i] for i in setup.plan.example_ids(step)]
      batches[step] = trainer.put_batch(setup.layout.pack(examples))

  def dispatch(state, step):
    prepare(step)
    started = time.perf_counter()
    state, metrics = trainer.train_step(state, batches.pop(step))
    return state, (step, metrics, started)

  if not len(steps):
    return
  state, running = dispatch(state, steps.start)
  previous_done = None  # when the previous step's metrics arrived
  for step in steps:
    more = step + 1 < steps.stop
    held = not more or hold(step + 1)
    if held:
      if more:
        prepare(step + 1)  # while this step runs
    else:
      next_state, next_running = dispatch(state, step + 1)  # queued behind this step
    record, previous_done = _read(setup, running, previous_done)
    if held:
      yield state, record
      if more:
        state, running = dispatch(state, step + 1)
    else:
      yield None, record
      state, running = next_state, next_running


def _read(setup, running, previous_done) -> tuple[dict, float]:
  """The record of a dispatched step; its time runs from when the device could start it (its
  dispatch, or the previous step's end if it was queued behind it) to its metrics."""
  step, metrics, started = running
  metrics = jax.device_get(metrics)
  now = time.perf_counter()
  step_time = now - max(started, previous_done or started)
  tokens = int(metrics["tokens"])
  return {"step": step + 1, "epoch": setup.plan.epoch_of(step) + 1,
          "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
          "grad_norm": float(metrics["grad_norm"]), "tokens": tokens, "step_time": step_time,
          "tokens_per_s": tokens / step_time}, now


def _end_of_epoch(setup, state, step, epoch_loss, reporter) -> None:
  """Dev loss and perplexity, the epoch's record and its dev generations; at step 0 (no train
  loss) for the starting params, as epoch 0."""
  epoch = step // setup.plan.steps_per_epoch
  summary = {} if epoch_loss is None else {"loss": epoch_loss[0] / max(epoch_loss[1], 1)}
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
