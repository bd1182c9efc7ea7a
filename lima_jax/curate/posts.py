"""One streaming pass over a site's `Posts.xml`: its best-scoring eligible questions and their top
answers, in memory bounded by the pool size however large the dump.

The dump's schema: `<posts>` holds one `<row>` per post, with PostTypeId 1 for questions (Title,
Body, Score, AcceptedAnswerId, AnswerCount) and 2 for answers (ParentId, Score, Body); bodies
are HTML. Rows come in Id order, so an answer follows its question: only answers to questions
still in the pool are kept, one per question (the top one).
"""

import collections
import dataclasses
import heapq
import re
import xml.etree.ElementTree as ET

from lima_jax.curate import filters
from lima_jax.errors import LimaError

_QUESTION, _ANSWER = "1", "2"


@dataclasses.dataclass
class Question:
  id: int
  score: int
  title: str
  body: str  # HTML
  accepted_id: int | None
  answer_key: tuple | None = None  # (score, is accepted, -id): the largest is the top answer
  answer_body: str = ""  # HTML

  @property
  def answer_score(self) -> int:
    return self.answer_key[0]


@dataclasses.dataclass
class SiteScan:
  """What a pass over one Posts.xml found: the site's size and its best questions."""
  questions: int = 0
  answers: int = 0
  removed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  pool: list[Question] = dataclasses.field(default_factory=list)  # best first


class _Pool:
  """The pool_size best questions so far; an evicted question takes its answer with it."""

  def __init__(self, size: int):
    self.size = size
    self.heap: list[tuple[int, int]] = []  # (score, -id): the root is the worst kept
    self.by_id: dict[int, Question] = {}
    self.evicted = 0

  def offer(self, q: Question) -> None:
    key = (q.score, -q.id)  # ties go to the older question
    if len(self.heap) < self.size:
      heapq.heappush(self.heap, key)
    elif key > self.heap[0]:
      _, worst = heapq.heapreplace(self.heap, key)
      del self.by_id[-worst]
      self.evicted += 1
    else:
      self.evicted += 1
      return
    self.by_id[q.id] = q

  def best_first(self) -> list[Question]:
    return sorted(self.by_id.values(), key=lambda q: (-q.score, q.id))


def scan(path: str, pool_size: int) -> SiteScan:
  """Streams `path`; every problem with the file is a LimaError naming it."""
  result = SiteScan()
  pool = _Pool(pool_size)
  try:
    with open(path, "rb") as f:
      root = None
      for event, elem in ET.iterparse(f, events=("start", "end")):
        if root is None:
          root = elem
          if elem.tag != "posts":
            raise LimaError(f"{path}: not a Stack Exchange Posts.xml (root element "
                            f"<{elem.tag}>, expected <posts>)")
        elif event == "end" and elem.tag == "row":
          _take_row(elem.attrib, path, result, pool)
          root.clear()  # drop the finished row, or the whole dump would pile up in memory
  except ET.ParseError as e:
    line, column = e.position  # expat counts columns from 0
    reason = re.sub(r": line \d+, column \d+$", "", str(e))
    raise LimaError(f"{path}:{line}:{column + 1}: malformed XML ({reason})") from None
  except OSError as e:
    raise LimaError(f"cannot read {path}: {e.strerror or e}") from None
  result.removed["outside_pool"] = pool.evicted
  result.pool = pool.best_first()
  return result


def _take_row(row: dict, path: str, result: SiteScan, pool: _Pool) -> None:
  kind = row.get("PostTypeId")
  if kind == _QUESTION:
    result.questions += 1
    title = row.get("Title", "")
    if not filters.title_self_contained(title):
      result.removed["title_not_self_contained"] += 1
    elif _int(row, "AnswerCount", path, default=1) == 0:
      result.removed["unanswered"] += 1
    else:
      pool.offer(Question(id=_int(row, "Id", path), score=_int(row, "Score", path),
                          title=title, body=row.get("Body", ""),
                          accepted_id=_int(row, "AcceptedAnswerId", path, default=None)))
  elif kind == _ANSWER:
    result.answers += 1
    q = pool.by_id.get(_int(row, "ParentId", path, default=None))
    if q is not None:
      answer_id = _int(row, "Id", path)
      key = (_int(row, "Score", path), answer_id == q.accepted_id, -answer_id)
      if q.answer_key is None or key > q.answer_key:
        q.answer_key, q.answer_body = key, row.get("Body", "")


def _int(row: dict, name: str, path: str, default: object = ...) -> int | None:
  value = row.get(name)
  if value is None:
    if default is ...:
      raise LimaError(f"{path}: post {row.get('Id', '?')} has no {name} attribute")
    return default
  try:
    return int(value)
  except ValueError:
    raise LimaError(f"{path}: post {row.get('Id', '?')} has {name}={value!r}, "
                    "expected an integer") from None
