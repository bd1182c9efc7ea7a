"""Orbax checkpoints of the train state, with JSON metadata beside each one.

Each checkpoint holds the full state (params, optimizer state, step) and metadata (config, epoch,
tokenizer hash, model shape). Restores always go through a target tree of sharded
ShapeDtypeStructs, so a checkpoint written on one mesh loads onto any other.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-write leaves the previous checkpoints intact; a checkpoint that is damaged anyway is
skipped on restore, with a warning, in favour of the one before it.
"""

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from lima_jax.errors import LimaError

STATE, META = "state", "meta"


class Checkpoints:
  """The checkpoints of one workdir: `<workdir>/checkpoints/<step>/{state,meta}`."""

  def __init__(self, directory: str, *, max_to_keep: int = 0, async_save: bool = True):
    self.directory = epath.Path(directory)
    # Item handlers are registered up front: a manager without them cannot read item metadata
    # in a fresh process.
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a write that was killed
            create=True))
    # Orbax deletes those leftovers on a background thread that its close() does not wait for
    # (0.12.8, no public call); a process that exits soon after (a refused workdir) would kill it
    # mid-delete with a traceback. Waiting here costs one directory listing.
    await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    # Retention is ours, not Orbax's: the newest `max_to_keep` epoch checkpoints, plus interval
    # checkpoints (for preemptible machines) only until a newer checkpoint is safely on disk.
    self._max_to_keep = max_to_keep
    self._writing, self._in_save = None, False  # the step of the newest save, and if in the call
    self._interval_steps = {s for s in self.all_steps() if self._is_interval(s)}

  def _is_interval(self, step: int) -> bool:
    try:
      return self.read_meta(step).get("kind") == "interval"
    except Exception:  # pylint: disable=broad-except  # damaged: restore() skips it anyway
      return False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def newest_complete_step(self) -> int | None:
    """The newest checkpoint whose write has finished; safe to ask from a signal handler that
    interrupted `save`."""
    written = not self._in_save and not self._manager.is_saving_in_progress()
    steps = [s for s in self.all_steps() if s != self._writing or written]
    return max(steps) if steps else None

  def save(self, step: int, state, meta: dict, *, interval: bool = False) -> None:
    """Starts an asynchronous save; training goes on while it is written.

    The previous save is finished first (Orbax does one at a time); only then are checkpoints
    it supersedes deleted.
    """
    self._manager.wait_until_finished()
    self._prune()
    if step in self.all_steps():  # a damaged checkpoint that the restore skipped
      self._manager.delete(step)
      self._interval_steps.discard(step)
    self._writing, self._in_save = step, True
    self._manager.save(step, force=True, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state),
           META: ocp.args.JsonSave(dict(meta, kind="interval" if interval else "epoch"))}))
    self._in_save = False
    if interval:
      self._interval_steps.add(step)

  def writing(self) -> bool:
    """Whether the last save is still being written. Every process gets the same answer (any
    process still writing counts), so they all save, or all skip, together."""
    busy = self._manager.is_saving_in_progress()
    if jax.process_count() > 1:
      busy = bool(np.any(multihost_utils.process_allgather(np.asarray(busy))))
    return busy

  def _prune(self) -> None:
    steps = sorted(self.all_steps())
    if not steps:
      return
    epochs = [s for s in steps if s not in self._interval_steps]
    stale = [s for s in steps if s in self._interval_steps and s < steps[-1]]
    if self._max_to_keep:
      stale += epochs[:-self._max_to_keep]
    for step in stale:
      self._manager.delete(step)
      self._interval_steps.discard(step)

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]

  def state_metadata(self, step: int):
    """The state's tree of Orbax array metadata (shape, dtype, sharding) at `step`, nothing
    restored. Read through the manager: a bare Checkpointer pointed at `<step>/state` looks for
    the step's _CHECKPOINT_METADATA file inside it and warns "Metadata file does not exist"."""
    return self._manager.item_metadata(step)[STATE].tree

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings given by `abstract_state` (ShapeDtypeStructs)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]

  def restore_newest(self, abstract_state, check_meta=None):
    """(state, step, meta) of the newest checkpoint that reads back whole, or None if none does.

    `check_meta(meta)` may raise LimaError to refuse a workdir (e.g. another model's); that
    error is not mistaken for damage.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("%s/%d: unreadable checkpoint metadata (%s); trying the one before",
                        self.directory, step, _one_line(e))
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        return self.restore(step, abstract_state), step, meta
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("%s/%d: damaged checkpoint (%s); trying the one before",
                        self.directory, step, _one_line(e))
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._prune()
    self._manager.close()


def _one_line(error: Exception) -> str:
  text = " ".join(str(error).split())
  return text[:200] + ("..." if len(text) > 200 else "")


# How a step is computed, not what it computes: a run may resume with another choice (say, more
# remat after running out of memory).
EXECUTION_ONLY_FIELDS = ("remat", "attention", "scan_layers")


def check_same_model(meta: dict, model_fields: dict, where: str) -> None:
  """Refuses to resume a workdir whose checkpoints hold a differently shaped model."""
  saved = meta.get("model", {})
  for key, value in model_fields.items():
    if key in EXECUTION_ONLY_FIELDS:
      continue
    if isinstance(value, tuple):  # the saved metadata is JSON: a list
      value = list(value)
    if key in saved and saved[key] != value:
      raise LimaError(f"{where}: holds a checkpoint with model.{key}={saved[key]!r}, but the "
                      f"config says {value!r}; use a fresh --workdir or the same model config")


# What fixes the step count and the LR of every step: a run resumed with other values would
# continue on another schedule from the middle of its own (the LR jumps). train.stop_after_steps
# is not here: it ends a run early without changing its schedule.
SCHEDULE_KEYS = ("train.epochs", "train.batch_size", "optimizer.learning_rate",
                 "optimizer.end_learning_rate", "optimizer.warmup_steps")


def check_same_schedule(meta: dict, current: dict, where: str) -> None:
  """Refuses to resume a workdir whose checkpoints were trained on another step count or LR
  schedule. `meta` is a checkpoint's metadata, `current` the metadata the run would write
  (both hold `config`, `steps_per_epoch`, `total_steps`)."""
  def value(m, key):
    section, name = key.split(".")
    return m.get("config", {}).get(section, {}).get(name)

  changed = [(key, value(meta, key), value(current, key)) for key in SCHEDULE_KEYS
             if value(meta, key) is not None and value(meta, key) != value(current, key)]
  saved_steps = meta.get("steps_per_epoch")
  if not changed and saved_steps is not None and saved_steps != current["steps_per_epoch"]:
    # Same batch size, so the training data holds another number of examples.
    changed = [("data.train_path's steps per epoch", saved_steps, current["steps_per_epoch"])]
  if changed:
    was = ", ".join(f"{key}={old}" for key, old, _ in changed)
    now = ", ".join(f"{key}={new}" for key, _, new in changed)
    raise LimaError(
        f"{where}: holds a run trained with {was}, but the config says {now}, which would change "
        f"its step count or learning-rate schedule mid-run; rerun with the workdir's values, or "
        f"train further in a fresh --workdir with --config.init_from={where} (its newest "
        "checkpoint's params)")
