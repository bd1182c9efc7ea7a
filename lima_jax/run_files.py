"""Where a run keeps what choosing its checkpoint needs, and how to find it again.

  <workdir>/generations/epoch_<E>.jsonl  dev generations at the end of epoch E
  <workdir>/epochs/<E>/{state,meta}      params of epoch E (Orbax, in checkpoint.export_dtype)
  <workdir>/checkpoints/<step>/          the trainer's full checkpoints
  <workdir>/metrics.jsonl, epochs.jsonl  per-step and per-epoch metrics (`RunReporter`)
  <workdir>/chosen.json                  the epoch picked with `python -m lima_jax.select --choose`
"""

import dataclasses
import json
import os
import re

import jax
from etils import epath

from lima_jax.checkpoint import Checkpoints
from lima_jax.errors import LimaError
from lima_jax.prompts import read_jsonl

GENERATIONS, EPOCH_PARAMS, CHECKPOINTS = "generations", "epochs", "checkpoints"
METRICS, EPOCHS, CHOSEN = "metrics.jsonl", "epochs.jsonl", "chosen.json"


def generations_path(workdir: str, epoch: int) -> str:
  return os.path.join(workdir, GENERATIONS, f"epoch_{epoch}.jsonl")


def generated_epochs(workdir: str) -> list[int]:
  folder = epath.Path(workdir) / GENERATIONS
  names = [p.name for p in folder.iterdir()] if folder.exists() else []
  return sorted(int(m[1]) for m in map(re.compile(r"epoch_(\d+)\.jsonl$").match, names) if m)


class EpochParamsWriter:
  """Params-only checkpoints numbered by epoch, beside the trainer's; made on first use.

  `dtype` ('float32' or 'bfloat16') is the stored dtype; restoring casts back to the model's
  param dtype. bf16 halves the bytes and loses nothing a bf16-compute generation sees: the
  model casts every weight matrix to the compute dtype before use (norm scales, kept in fp32
  compute, do round).
  """

  def __init__(self, workdir: str, *, async_save: bool, dtype: str = "float32"):
    self.directory = os.path.join(workdir, EPOCH_PARAMS)
    self._async = async_save
    self._ckpts = None
    self._cast = jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree))
    self.dtype = dtype

  def save(self, epoch: int, params, meta: dict) -> None:
    if self._ckpts is None:
      self._ckpts = Checkpoints(self.directory, async_save=self._async)
    if epoch in self._ckpts.all_steps():
      return  # a resumed run repeats an epoch exactly: its params are already here
    if any(x.dtype != self.dtype for x in jax.tree.leaves(params)):
      params = self._cast(params)
    self._ckpts.save(epoch, {"params": params}, dict(meta, export_dtype=self.dtype))

  def writing(self) -> bool:
    return self._ckpts is not None and self._ckpts.writing()

  def close(self) -> None:
    if self._ckpts is not None:
      self._ckpts.close()


@dataclasses.dataclass(frozen=True)
class Kept:
  """Params on disk: checkpoint `number` of the Orbax directory `directory`."""
  directory: str
  number: int  # the epoch for a params export, the step for a full checkpoint
  step: int
  epoch: int | None  # None for a checkpoint in the middle of an epoch
  meta: dict


def check_workdir(workdir: str) -> None:
  if not epath.Path(workdir).is_dir():
    raise LimaError(f"--workdir: {workdir}: no such directory")


def _checkpoints(directory: str) -> list[Kept]:
  """Every checkpoint of an Orbax directory with its metadata (none if it does not exist)."""
  if not epath.Path(directory).is_dir():
    return []
  ckpts = Checkpoints(directory, async_save=False)
  try:
    kept = []
    for number in sorted(ckpts.all_steps()):
      meta = ckpts.read_meta(number)
      epoch = meta.get("epoch")
      whole = isinstance(epoch, (int, float)) and float(epoch).is_integer()
      kept.append(Kept(directory, number, int(meta.get("step", number)),
                       int(epoch) if whole else None, meta))
    return kept
  finally:
    ckpts.close()


def kept_epochs(workdir: str) -> dict[int, Kept]:
  """epoch -> where its params are: a params export, or a full checkpoint at the epoch's end."""
  found = {}
  # Exports are listed last so they win: params alone restore faster than a full state.
  for kept in _checkpoints(_abs(workdir, CHECKPOINTS)) + _checkpoints(_abs(workdir, EPOCH_PARAMS)):
    if kept.epoch is not None:
      found[kept.epoch] = kept
  return found


def locate(workdir: str, *, epoch: int | None = None, step: int | None = None,
           flag: str = "--epoch") -> Kept:
  """The params of an epoch, of a step, or (neither given) of the latest checkpoint."""
  check_workdir(workdir)
  if epoch is not None:
    kept = kept_epochs(workdir)
    if epoch not in kept:
      have = ", ".join(map(str, sorted(kept))) or "none"
      raise LimaError(f"{flag}={epoch}: no params kept for epoch {epoch} in {workdir} "
                      f"(epochs with params: {have})")
    return kept[epoch]
  full = _checkpoints(_abs(workdir, CHECKPOINTS))
  if not full:
    raise LimaError(f"--workdir: {workdir} holds no checkpoints")
  if step is None:
    return full[-1]
  by_step = {k.step: k for k in full}
  if step not in by_step:
    raise LimaError(f"--step={step}: no checkpoint of step {step} in {workdir} "
                    f"(steps: {', '.join(map(str, sorted(by_step)))})")
  return by_step[step]


def _abs(workdir: str, name: str) -> str:
  # Orbax wants absolute local paths; gs:// paths are absolute already.
  path = os.path.join(workdir, name)
  return path if "://" in path else os.path.abspath(path)


def _last_per(records: list[dict], key: str) -> list[dict]:
  """A resumed run logs again the steps after its last checkpoint: keep each key's last record."""
  last = {r[key]: r for r in records if key in r}
  return [last[k] for k in sorted(last)]


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
  """(per-step records, per-epoch records), each deduplicated and in order."""
  paths = [os.path.join(workdir, name) for name in (METRICS, EPOCHS)]
  steps, epochs = (read_jsonl(p) if epath.Path(p).exists() else [] for p in paths)
  return _last_per(steps, "step"), _last_per(epochs, "epoch")


def read_choice(workdir: str) -> dict | None:
  path = epath.Path(workdir) / CHOSEN
  return json.loads(path.read_text()) if path.exists() else None


def write_choice(workdir: str, choice: dict) -> str:
  path = epath.Path(workdir) / CHOSEN
  path.write_text(json.dumps(choice, indent=2) + "\n")
  return str(path)
