"""Orbax checkpoints of the train state, with JSON metadata beside each one.

Each checkpoint holds the full state (params, optimizer state, step) and metadata (config, epoch,
tokenizer hash, model shape). Restores always go through a target tree of sharded
ShapeDtypeStructs, so a checkpoint written on one mesh loads onto any other.
"""

import json

import jax
import orbax.checkpoint as ocp
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
            max_to_keep=max_to_keep or None,
            enable_async_checkpointing=async_save,
            create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save; training goes on while it is written."""
    self._manager.save(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}))

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return restored[META]

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings given by `abstract_state` (ShapeDtypeStructs)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def check_same_model(meta: dict, model_fields: dict, where: str) -> None:
  """Refuses to resume a workdir whose checkpoints hold a differently shaped model."""
  saved = meta.get("model", {})
  for key, value in model_fields.items():
    if key in saved and saved[key] != value:
      raise LimaError(f"{where}: holds a checkpoint with model.{key}={saved[key]!r}, but the "
                      f"config says {value!r}; use a fresh --workdir or the same model config")


def abstract_with_shardings(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def to_json(obj) -> str:
  return json.dumps(obj, sort_keys=True)
