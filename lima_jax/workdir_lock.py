"""One training run per workdir at a time.

A local workdir is locked with `fcntl.flock` on `<workdir>/run.lock` for as long as a run trains
in it. The kernel drops a flock when the process that holds it ends, however it ends (SIGKILL and
a crash included), so a lock never outlives its run and a rerun never needs a clean-up. The file
stays: it says which run held it last (host, pid, since when), which is what a refused run
reports. It is never deleted, since deleting it would let two runs lock two different files.

In a multi-host run process 0 alone takes the lock (the other hosts' processes are the same run),
and every process learns whether it got it, so a refused run stops on every host.

A `gs://` workdir is not locked: Cloud Storage has no lock that is released when the machine
holding it dies, and a lock that outlives a killed run would block its rerun. Two runs on one
gs:// workdir are not detected.
"""

import datetime
import fcntl
import json
import os
import socket

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from lima_jax.errors import LimaError

LOCK_FILE = "run.lock"


class WorkdirLock:
  """Context manager holding the workdir's lock; raises LimaError on entry if another run
  holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._file = None

  def __enter__(self):
    refusal = None
    if jax.process_index() == 0 and "://" not in self.workdir:
      try:
        refusal = self._acquire()
      except OSError as e:  # still meet the other processes below
        refusal = f"--workdir: {self.workdir}: {e.strerror or e}"
    if jax.process_count() > 1:  # all processes of the run go on, or none does
      refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
      if refused and refusal is None:
        refusal = f"--workdir: {self.workdir}: refused by process 0 (see its error)"
    if refusal:
      raise LimaError(refusal)
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def _acquire(self) -> str | None:
    """Takes the lock, or returns why not."""
    os.makedirs(self.workdir, exist_ok=True)
    path = os.path.join(self.workdir, LOCK_FILE)
    # Opened without truncating: a run that is refused must not erase the holder's note.
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(f.read())
      f.close()
      return (f"--workdir: {self.workdir} is in use by another run ({holder}); wait for it to "
              "end or stop it, or train in another --workdir")
    except OSError as e:  # a filesystem without flock (some FUSE mounts): train unlocked
      f.close()
      logging.warning("%s: cannot lock (%s); another run on this workdir would go unnoticed",
                      path, e)
      return None
    f.truncate(0)
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "since": datetime.datetime.now().astimezone().isoformat(" ", "seconds")})
            + "\n")
    f.flush()
    self._file = f
    return None


def _describe(note: str) -> str:
  try:
    holder = json.loads(note)
    return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
  except (ValueError, KeyError, TypeError):  # caught between the holder's lock and its note
    return "holder not yet recorded"
