"""An LLM judge over any OpenAI-compatible endpoint (`POST <endpoint>/chat/completions`).

LIMA (section 3) gave GPT-4 the same instructions and data as its people. Each pair is judged
in both orders (MT-Bench's remedy for position bias; a disagreement counts as a tie in the
report). The verdict is read from the first answer token's `top_logprobs` when the endpoint
returns them (AlpacaEval's way: the likeliest of the choice letters, so a small judge always
gives a verdict), else from the reply's text; a reply that holds neither is a failure, never a
verdict. Requests run concurrently and are retried with exponential backoff on 429, 5xx, timeouts
and dropped connections. Every attempt's request and raw reply is stored (table `calls`) and
each verdict is committed as it arrives (table `judgements`), so a rerun, or a run killed half
way, judges only what has no verdict yet.
"""

import asyncio
import collections
import dataclasses
import json
import math
import random
import time

import httpx

from lima_jax.evaluate import assign, protocol
from lima_jax.evaluate.store import Study

RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclasses.dataclass(frozen=True)
class Settings:
  endpoint: str  # base URL, e.g. http://127.0.0.1:8000/v1
  model: str
  api_key: str | None = None
  concurrency: int = 4
  retries: int = 4  # attempts after the first
  backoff_s: float = 1.0  # the first retry's wait; doubled each time, with jitter
  timeout_s: float = 120.0
  max_tokens: int = 8  # the verdict is one letter or digit; a few more tokens for chatty judges
  logprobs: bool = True
  top_logprobs: int = 20


@dataclasses.dataclass(frozen=True)
class Job:
  """One request: `unit`, with the answers in order `ord` (pairwise 1: the opponent's first)."""
  unit: assign.Unit
  ord: int

  def key(self, judge: str) -> tuple:
    t = self.unit.task
    return (judge, t.mode, self.unit.item, self.unit.sample, t.system, t.opponent, self.ord)


def judge_name(model: str) -> str:
  """The rater name a judge's verdicts carry in the report: `judge:<model>`."""
  return f"judge:{model}"


def jobs(study: Study, tasks: list[assign.Task]) -> list[Job]:
  """Every request the tasks need: both orders of every pair, one per rated answer."""
  out = []
  for task in tasks:
    orders = (0, 1) if task.mode == "pairwise" else (0,)
    out += [Job(assign.Unit(task, i, s), o) for i, s in assign.units(study, task) for o in orders]
  return out


def verdict_from(mode: str, body: dict) -> tuple[str | None, str, str | None]:
  """(choice value or None, how it was read: 'logprobs' or 'text', error) from a
  chat/completions reply."""
  try:
    choice = body["choices"][0]
    text = choice["message"]["content"] or ""
  except (KeyError, IndexError, TypeError):
    return None, "", "the reply has no choices[0].message.content"
  keys = {c.key: c.value for c in protocol.CHOICES[mode]}
  content = ((choice.get("logprobs") or {}).get("content")) or []
  first = next((t for t in content if t.get("token", "").strip()), None)
  if first is not None:
    mass = {}
    for alt in first.get("top_logprobs") or [first]:
      key = alt.get("token", "").strip().upper()
      if key in keys and isinstance(alt.get("logprob"), (int, float)):
        mass[key] = mass.get(key, 0.0) + math.exp(alt["logprob"])
    if mass:
      return keys[max(mass, key=mass.get)], "logprobs", None
  value = protocol.parse_reply(mode, text)
  if value is None:
    return None, "", f"unparseable reply: {text[:200]!r}"
  return value, "text", None


class Judge:
  """Judges a study's tasks with one model; `run` returns counts of what happened."""

  def __init__(self, study: Study, settings: Settings):
    self.study, self.s = study, settings
    self.name = judge_name(settings.model)
    self._items = {it["item"]: it for it in study.items()}
    self._answers = {}
    self.failures = collections.Counter()  # why requests failed (after retries), for the user

  def todo(self, tasks: list[assign.Task]) -> tuple[list[Job], int]:
    """(the jobs with no verdict yet, how many already have one)."""
    with self.study.read() as db:
      judged = {tuple(r) for r in db.execute(
          "SELECT judge, mode, item, sample, system, opponent, ord FROM judgements "
          "WHERE judge = ? AND status = 'ok'", (self.name,))}
    every = jobs(self.study, tasks)
    left = [j for j in every if j.key(self.name) not in judged]
    return left, len(every) - len(left)

  def request(self, job: Job) -> dict:
    task, unit = job.unit.task, job.unit
    names = [task.system, task.opponent] if task.mode == "pairwise" else [task.system]
    if job.ord == 1:
      names.reverse()
    texts = [self._answer(n)[(unit.item, unit.sample)] for n in names]
    body = {"model": self.s.model, "temperature": 0, "max_tokens": self.s.max_tokens,
            "messages": protocol.judge_messages(task.mode, self._items[unit.item]["turns"],
                                                texts)}
    if self.s.logprobs:
      body.update(logprobs=True, top_logprobs=self.s.top_logprobs)
    return body

  def _answer(self, system: str) -> dict:
    if system not in self._answers:
      self._answers[system] = self.study.answers(system)
    return self._answers[system]

  async def run(self, tasks: list[assign.Task], on_done=None) -> dict:
    left, skipped = self.todo(tasks)
    counts = {"skipped": skipped, "logprobs": 0, "text": 0, "failed": 0}
    gate = asyncio.Semaphore(self.s.concurrency)
    headers = {"Authorization": f"Bearer {self.s.api_key}"} if self.s.api_key else {}
    async with httpx.AsyncClient(base_url=self.s.endpoint.rstrip("/"), headers=headers,
                                 timeout=self.s.timeout_s) as client:

      async def one(job: Job):
        async with gate:
          how = await self._judge(client, job)
        counts[how] += 1
        if on_done:
          on_done()

      await asyncio.gather(*(one(j) for j in left))
    return counts

  async def _judge(self, client: httpx.AsyncClient, job: Job) -> str:
    body = self.request(job)
    value, how, error = None, "", None
    for attempt in range(self.s.retries + 1):
      status, raw, retry = None, None, False
      try:
        reply = await client.post("/chat/completions", json=body)
        status, raw = reply.status_code, reply.text
        if status == 200:
          value, how, error = verdict_from(job.unit.task.mode, _json(raw))
        else:
          error, retry = _http_error(status, raw), status in RETRY_STATUS
      except httpx.TimeoutException as e:
        error, retry = f"timeout ({type(e).__name__})", True
      except httpx.TransportError as e:
        error, retry = f"connection failed ({type(e).__name__}: {e})", True
      self._record_call(job, attempt, body, status, raw, error)
      if value is not None or not retry or attempt == self.s.retries:
        break
      await asyncio.sleep(self.s.backoff_s * 2 ** attempt * (0.5 + random.random()))
    self._record_verdict(job, value, how, error, attempt + 1)
    if value is None:
      self.failures[error] += 1
    return how if value is not None else "failed"

  def _record_call(self, job, attempt, body, status, raw, error) -> None:
    with self.study.write() as db:
      db.execute("INSERT INTO calls (judge, mode, item, sample, system, opponent, ord, attempt, "
                 "request, status, reply, error, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                 "?, ?, ?)", job.key(self.name) + (attempt, json.dumps(body), status, raw, error,
                                                   time.time()))

  def _record_verdict(self, job, value, how, error, attempts) -> None:
    """The job's row in `judgements`: one per (item, sample, systems, order, judge), replaced
    by a later run only while it is a failure."""
    task = job.unit.task
    if value is not None and task.mode == "pairwise":
      first, second = ((task.system, task.opponent) if job.ord == 0
                       else (task.opponent, task.system))
      value = {"left": first, "right": second}.get(value, protocol.TIE)
    with self.study.write() as db:
      db.execute("INSERT INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT DO UPDATE SET status = excluded.status, verdict = excluded.verdict,"
                 " how = excluded.how, error = excluded.error, attempts = excluded.attempts, "
                 "updated = excluded.updated WHERE judgements.status != 'ok'",
                 job.key(self.name) + ("ok" if value is not None else "failed", value, how or None,
                                       None if value is not None else error, attempts,
                                       time.time()))


def _http_error(status: int, raw: str) -> str:
  """'HTTP 404: <the endpoint's own message>' (OpenAI's error object), or 'HTTP 404'."""
  body = _json(raw)
  message = body.get("error") if isinstance(body, dict) else None
  message = message.get("message") if isinstance(message, dict) else message
  return f"HTTP {status}: {message}" if isinstance(message, str) and message else f"HTTP {status}"


def _json(raw: str):
  try:
    return json.loads(raw)
  except json.JSONDecodeError:
    return None
