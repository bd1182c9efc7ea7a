"""Where a run reports: metrics.jsonl, TensorBoard events and a progress bar.

Only process 0 writes; on other hosts every method is a no-op, so callers need not check.
A remote workdir (gs://) cannot be appended to: the files are written to a local mirror
(`local_mirror`) and copied to the workdir at every epoch's end and when the run stops.
"""

import hashlib
import json
import os
import shutil

import jax
import tqdm
from etils import epath
from tensorboardX import SummaryWriter

JSONL = ("metrics.jsonl", "epochs.jsonl")


class RunReporter:

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self._remote = workdir if "://" in workdir else None
    if self._remote:
      workdir = local_mirror(workdir)
      shutil.rmtree(workdir, ignore_errors=True)  # what an earlier run left: the remote rules
    os.makedirs(workdir, exist_ok=True)
    self._workdir = workdir
    if self._remote:  # the remote files are the record: a resumed run continues them
      for name in JSONL:
        source = epath.Path(self._remote) / name
        if source.exists():
          source.copy(epath.Path(workdir) / name, overwrite=True)
    # Appending keeps the history of a resumed run in one file; rows past the step it resumes
    # from (logged before the run was stopped, after its newest checkpoint) are dropped first,
    # since the resumed run logs those steps again: each step has one row.
    for name in JSONL:
      _drop_rows_after(os.path.join(workdir, name), initial_step)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    # TensorBoard hides what an earlier process logged from the first step this one logs on
    # (the steps after the checkpoint it resumes from, which it logs again; all of a fresh start).
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=initial_step + 1 if initial_step else 0)
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                          dynamic_ncols=True, desc="train")

  def step(self, record: dict) -> None:
    """One train step: record holds step, epoch, loss, lr, grad_norm, tokens, step_time."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    step = record["step"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
      self._tb.add_scalar(f"train/{key}", record[key], step)
    self._bar.set_postfix(epoch=record["epoch"], loss=f"{record['loss']:.4f}",
                          lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    self._bar.update(1)

  def epoch(self, epoch: int, summary: dict, step: int) -> None:
    """End of an epoch: its mean train loss, and dev loss / perplexity when there is a dev set."""
    if not self.enabled:
      return
    for key, value in summary.items():
      self._tb.add_scalar(f"epoch/{key}", value, step)
    self._tb.flush()
    with open(os.path.join(self._workdir, "epochs.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps({"epoch": epoch, "step": step, **summary}) + "\n")
    self._bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    self._upload()

  def message(self, text: str) -> None:
    if self.enabled:
      self._bar.write(text)

  def close(self) -> None:
    if not self.enabled:
      return
    self._bar.close()
    self._tb.close()
    self._jsonl.close()
    self._upload()

  def _upload(self) -> None:
    """A remote workdir gets the mirror's files whole (objects there are written, not appended)."""
    if not self._remote:
      return
    for base, _, names in os.walk(self._workdir):
      for name in names:
        local = os.path.join(base, name)
        target = epath.Path(self._remote) / os.path.relpath(local, self._workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        epath.Path(local).copy(target, overwrite=True)


def local_mirror(workdir: str) -> str:
  """The local directory that holds a remote workdir's metrics while a run writes them."""
  digest = hashlib.sha256(workdir.encode()).hexdigest()[:16]
  return os.path.join(os.path.expanduser("~/.cache/lima_jax/runs"), digest)


def _drop_rows_after(path: str, step: int) -> None:
  """Keeps the rows of a JSONL metrics file up to `step`, and drops a last line cut short by a
  killed run; the file is replaced whole, so a kill meanwhile leaves the old one."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short when the process was killed mid-write
  if kept == lines:
    return
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)
