"""Which item a rater sees next, and on which side each answer is shown.

LIMA (section 3) gave 50 items to every rater, to measure agreement, and spread the rest. Here a
study's shared items go to every rater; every other item goes to the first rater who reaches it
(a claim, stored), so raters arriving at any time split the rest between them. A rater's
unanswered claim is shown again first: closing the page, or the server dying, resumes there.
"""

import dataclasses
import random
import time

from lima_jax.evaluate.store import Study


@dataclasses.dataclass(frozen=True)
class Task:
  """What is asked: `system` against `opponent` (pairwise), or `system`'s answers rated alone
  (absolute, helpfulness; opponent '')."""
  mode: str
  system: str
  opponent: str = ""

  @property
  def key(self) -> str:
    return f"{self.mode}/{self.system}/{self.opponent}"


@dataclasses.dataclass(frozen=True)
class Unit:
  task: Task
  item: int
  sample: int


def tasks_for(mode: str, system: str, against: list[str]) -> list[Task]:
  if mode == "pairwise":
    return [Task(mode, system, other) for other in against]
  return [Task(mode, name) for name in [system] + against]


def units(study: Study, task: Task) -> list[tuple[int, int]]:
  """The (item, sample) pairs a task asks about, in study order: pairwise compares sample 0 of
  both systems on the items both answered; a rating covers every sample of the system."""
  mine = study.answers(task.system)
  if task.mode != "pairwise":
    return sorted(mine)
  theirs = study.answers(task.opponent)
  return sorted((i, 0) for i, s in mine if s == 0 and (i, 0) in theirs)


def left_system(study: Study, rater: str, unit: Unit) -> str:
  """The system shown on the left (as A): random per item and per rater, seeded by the study's
  seed, so the same rater always sees an item the same way."""
  draw = random.Random(f"{study.seed}/{rater}/{unit.task.key}/{unit.item}/{unit.sample}")
  return unit.task.system if draw.random() < 0.5 else unit.task.opponent


def next_unit(study: Study, rater: str, tasks: list[Task]) -> tuple[Unit | None, int, int]:
  """(the rater's next unit or None when done, units they rated, units in all for them)."""
  shared = {it["item"] for it in study.items() if it["shared"]}
  found, done, left = None, 0, 0
  with study.write() as db:
    for task in tasks:
      todo = units(study, task)
      mine = {(r[0], r[1]) for r in db.execute(
          "SELECT item, sample FROM votes WHERE rater = ? AND mode = ? AND system = ? AND "
          "opponent = ?", (rater, task.mode, task.system, task.opponent))}
      anyone = {(r[0], r[1]) for r in db.execute(
          "SELECT item, sample FROM votes WHERE mode = ? AND system = ? AND opponent = ?",
          (task.mode, task.system, task.opponent))}
      claims = {}
      for r in db.execute("SELECT item, sample, rater FROM claims WHERE task = ?", (task.key,)):
        claims.setdefault((r[0], r[1]), set()).add(r[2])
      mine_claimed = [u for u in todo if rater in claims.get(u, ()) and u not in mine]
      shared_open = [u for u in todo if u[0] in shared and u not in mine]
      free = [u for u in todo if u[0] not in shared and u not in claims and u not in anyone]
      done += len(mine)
      left += len(set(mine_claimed) | set(shared_open) | set(free))
      if found is None:
        pick = (mine_claimed or shared_open or free or [None])[0]
        if pick is not None:
          found = Unit(task, *pick)
          db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?, ?, ?, ?)",
                     (rater, task.key, pick[0], pick[1], time.time()))
  return found, done, done + left
