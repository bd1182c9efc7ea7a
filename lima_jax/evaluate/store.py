"""A study directory: <dir>/study.sqlite holds its prompts, every system's answers, every vote
and every judge request, reply and verdict; <dir>/report.* are written by `report`.

SQLite in WAL mode, one transaction per vote or verdict: a page or judge killed at any moment
loses nothing already acknowledged, and readers (the report, other raters) never block writers.
"""

import contextlib
import json
import os
import random
import sqlite3
import time

from lima_jax.errors import LimaError

DATABASE = "study.sqlite"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (item INTEGER PRIMARY KEY, line INTEGER NOT NULL, source TEXT NOT NULL,
  turns TEXT NOT NULL, reference TEXT, shared INTEGER NOT NULL);
CREATE TABLE answers (system TEXT NOT NULL, item INTEGER NOT NULL, sample INTEGER NOT NULL,
  text TEXT NOT NULL, origin TEXT NOT NULL, PRIMARY KEY (system, item, sample));
CREATE TABLE claims (rater TEXT NOT NULL, task TEXT NOT NULL, item INTEGER NOT NULL,
  sample INTEGER NOT NULL, claimed REAL NOT NULL, PRIMARY KEY (task, item, sample, rater));
CREATE TABLE votes (id INTEGER PRIMARY KEY, rater TEXT NOT NULL, origin TEXT NOT NULL,
  mode TEXT NOT NULL, item INTEGER NOT NULL, sample INTEGER NOT NULL, system TEXT NOT NULL,
  opponent TEXT NOT NULL, left_system TEXT, choice TEXT NOT NULL, created REAL NOT NULL,
  UNIQUE (rater, mode, item, sample, system, opponent));
CREATE TABLE judgements (judge TEXT NOT NULL, mode TEXT NOT NULL, item INTEGER NOT NULL,
  sample INTEGER NOT NULL, system TEXT NOT NULL, opponent TEXT NOT NULL, ord INTEGER NOT NULL,
  status TEXT NOT NULL, verdict TEXT, how TEXT, error TEXT, attempts INTEGER NOT NULL,
  updated REAL NOT NULL, PRIMARY KEY (judge, mode, item, sample, system, opponent, ord));
CREATE TABLE calls (id INTEGER PRIMARY KEY, judge TEXT NOT NULL, mode TEXT NOT NULL,
  item INTEGER NOT NULL, sample INTEGER NOT NULL, system TEXT NOT NULL, opponent TEXT NOT NULL,
  ord INTEGER NOT NULL, attempt INTEGER NOT NULL, request TEXT NOT NULL, status INTEGER,
  reply TEXT, error TEXT, created REAL NOT NULL);
"""


class Study:
  """One study directory. Every method opens its own connection, so the page's worker threads
  and the judge's tasks each write through their own."""

  def __init__(self, directory: str):
    self.directory = directory
    self.path = os.path.join(directory, DATABASE)
    if not os.path.isfile(self.path):
      raise LimaError(f"--study: {directory} is not a study (no {DATABASE}); "
                      "make one with `python -m lima_jax.evaluate new`")
    self.seed = int(self.meta()["seed"])

  @classmethod
  def create(cls, directory: str, items: list[dict], *, shared: int, seed: int) -> "Study":
    """A new study of `items` (dicts: line, source, turns, reference); `shared` of them, drawn
    with `seed`, go to every rater (the paper's 50 for agreement, section 3)."""
    path = os.path.join(directory, DATABASE)
    if os.path.exists(path):
      raise LimaError(f"--study: {directory} already holds a study; choose a new directory")
    os.makedirs(directory, exist_ok=True)
    chosen = set(random.Random(seed).sample(range(len(items)), min(shared, len(items))))
    with contextlib.closing(_connect(path)) as db:
      db.executescript(_SCHEMA)
      db.execute("BEGIN")
      db.executemany("INSERT INTO meta VALUES (?, ?)", [
          ("seed", str(seed)), ("shared", str(len(chosen))), ("created", str(time.time()))])
      db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)", [
          (i, it["line"], it["source"], json.dumps(it["turns"]), it["reference"],
           int(i in chosen)) for i, it in enumerate(items)])
      db.execute("COMMIT")
    return cls(directory)

  @contextlib.contextmanager
  def read(self):
    with contextlib.closing(_connect(self.path)) as db:
      yield db

  @contextlib.contextmanager
  def write(self):
    """One transaction, taken at once (BEGIN IMMEDIATE) so two writers never deadlock."""
    with contextlib.closing(_connect(self.path)) as db:
      db.execute("BEGIN IMMEDIATE")
      try:
        yield db
      except BaseException:
        db.execute("ROLLBACK")
        raise
      db.execute("COMMIT")

  def meta(self) -> dict:
    with self.read() as db:
      return dict(db.execute("SELECT key, value FROM meta"))

  def items(self) -> list[dict]:
    with self.read() as db:
      rows = db.execute("SELECT item, line, source, turns, reference, shared FROM items "
                        "ORDER BY item").fetchall()
    return [dict(item=r[0], line=r[1], source=r[2], turns=json.loads(r[3]), reference=r[4],
                 shared=bool(r[5])) for r in rows]

  def systems(self) -> list[str]:
    with self.read() as db:
      return [r[0] for r in db.execute("SELECT DISTINCT system FROM answers ORDER BY system")]

  def answers(self, system: str) -> dict[tuple[int, int], str]:
    """(item, sample) -> answer text."""
    with self.read() as db:
      return {(r[0], r[1]): r[2] for r in db.execute(
          "SELECT item, sample, text FROM answers WHERE system = ?", (system,))}

  def check_systems(self, names: list[str], flag: str) -> None:
    have = self.systems()
    for name in names:
      if name not in have:
        raise LimaError(f"{flag}={name}: no such system in {self.directory} "
                        f"(systems: {', '.join(have) or 'none; add one with `add`'})")

  def add_answers(self, system: str, rows: list[tuple[int, int, str]], origin: str) -> None:
    """Stores (item, sample, text) rows as `system`'s answers; a system is added once."""
    with self.write() as db:
      if db.execute("SELECT 1 FROM answers WHERE system = ? LIMIT 1", (system,)).fetchone():
        raise LimaError(f"--system={system}: {self.directory} already holds its answers")
      db.executemany("INSERT INTO answers VALUES (?, ?, ?, ?, ?)",
                     [(system, i, s, text, origin) for i, s, text in rows])

  def add_vote(self, db, *, rater: str, origin: str, mode: str, item: int, sample: int,
               system: str, opponent: str, left: str | None, choice: str) -> bool:
    """Inside a `write()` transaction: one vote; False when this rater already voted on it
    (a form sent twice counts once)."""
    cursor = db.execute(
        "INSERT INTO votes (rater, origin, mode, item, sample, system, opponent, left_system, "
        "choice, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (rater, origin, mode, item, sample, system, opponent, left, choice, time.time()))
    return cursor.rowcount == 1

  def votes(self, mode: str) -> list[dict]:
    with self.read() as db:
      db.row_factory = sqlite3.Row
      return [dict(r) for r in db.execute("SELECT * FROM votes WHERE mode = ? ORDER BY id",
                                          (mode,))]

  def judgements(self, mode: str) -> list[dict]:
    with self.read() as db:
      db.row_factory = sqlite3.Row
      return [dict(r) for r in db.execute(
          "SELECT * FROM judgements WHERE mode = ? ORDER BY judge, item, sample, ord", (mode,))]


def _connect(path: str) -> sqlite3.Connection:
  # isolation_level=None: transactions are ours (BEGIN ... COMMIT), not the module's guesses.
  db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
  db.execute("PRAGMA journal_mode=WAL")
  db.execute("PRAGMA synchronous=FULL")  # a vote acknowledged is on disk, even on power loss
  return db


def prompt_items(conversations) -> list[dict]:
  """Study items from GAIR/lima records (`lima_jax.data.Conversation`): a record ending with an
  assistant turn is prompted with what comes before it, which is then its reference (as
  `lima_jax.prompts.load_prompts` does for generation)."""
  items = []
  for record in conversations:
    answered = len(record.turns) % 2 == 0
    items.append(dict(line=record.line, source=record.source,
                      turns=list(record.turns[:-1] if answered else record.turns),
                      reference=record.turns[-1] if answered else None))
  return items
