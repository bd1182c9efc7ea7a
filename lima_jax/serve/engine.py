"""Continuous batching: a scheduler thread that gives free slots to waiting requests (one prefill
each) and advances every active slot by one token per compiled decode step.

A request finishes at a stop id (the tokenizer's `stop_ids`, EOT first), at a stop string, after
its `max_new` tokens, or when its client goes away (`cancel`); its slot goes to the next waiting
request at once, so a long answer never holds back a new one. Results flow out through the
request's `sink`, called on the scheduler thread: the HTTP layer hands them to its event loop,
the terminal chat prints them.
"""

import collections
import dataclasses
import threading
import traceback
from typing import Callable

import jax
import numpy as np
from absl import logging

from lima_jax.serve.slots import RowState, SlotModel, request_key
from lima_jax.serve.text import TextTail


@dataclasses.dataclass
class Piece:
  """One generated token: its id, the text it releases (may be ''), its log-probability and the
  TOP_K likeliest (values, ids) at its position (the model's own log-softmax)."""
  token: int
  text: str
  logprob: float
  top: tuple


@dataclasses.dataclass
class Echo:
  """The prompt's own logprobs (a request with echo), before its first Piece: for i >= 1 the
  logprob of ids[i] given ids[:i] [len - 1], and the TOP_K likeliest (values, ids) there."""
  logprobs: np.ndarray
  top: tuple


@dataclasses.dataclass
class Finished:
  """The end of a request: reason 'stop' (stop id or string) or 'length' (max_new or the
  context); or 'error' with a message."""
  reason: str
  prompt_tokens: int
  completion_tokens: int
  message: str = ""


@dataclasses.dataclass(eq=False)
class Request:
  """A prompt and how to answer it. settings: temperature, top_p, repetition_penalty,
  penalize_prompt; max_new: tokens at most (prompt + max_new within the context); echo: also the
  prompt's logprobs; sink: receives Pieces, then one Finished."""
  ids: np.ndarray
  settings: dict
  greedy: bool
  seed: int
  max_new: int
  sink: Callable
  stop: tuple[str, ...] = ()
  echo: bool = False
  ignore_eos: bool = False  # no stop at stop ids: exactly max_new tokens (benchmarks)
  cancelled: bool = False
  generated: int = 0  # tokens handed to the sink
  dispatched: int = 0  # tokens whose step has been sent to the device
  tail: TextTail | None = None

  def cancel(self) -> None:
    """The client is gone: the scheduler frees the slot before its next step."""
    self.cancelled = True


class EngineClosed(Exception):
  """The engine is shutting down and takes no new request."""


class Engine:
  """The scheduler over a `SlotModel`. `start` runs it on a daemon thread; `close` lets the
  requests already taken finish, then stops it.

  Steps are pipelined: step t + 1 is sent to the device before step t's results are read (each
  row's token stays on the device between steps; positions and step counts are known ahead on
  the host), so the host's work on a token (sinks, text, HTTP) overlaps the next step. A row
  that stops at a stop id was already sent one step further; that step's result is dropped.
  """

  def __init__(self, model: SlotModel, tokenizer):
    self.model, self.tokenizer = model, tokenizer
    self.stop_ids = frozenset(int(i) for i in tokenizer.stop_ids)
    n = model.slots
    self.rows: list[Request | None] = [None] * n
    self.positions = np.full(n, -1, np.int32)  # where each row's next input token goes
    self.row_state = RowState(n)
    self._pending = None  # (device results, [(slot, request)] run): the step not yet read
    self.waiting: collections.deque[Request] = collections.deque()
    self._cv = threading.Condition()
    self._closing = False
    self.cancelled = 0  # requests dropped because their client went away
    self._thread = threading.Thread(target=self._run, name="lima-engine", daemon=True)

  def start(self) -> "Engine":
    self._thread.start()
    return self

  def submit(self, request: Request) -> None:
    """Queues a request; raises EngineClosed once `close` was called."""
    request.tail = TextTail(self.tokenizer.decode, request.stop)
    with self._cv:
      if self._closing:
        raise EngineClosed("the server is shutting down")
      self.waiting.append(request)
      self._cv.notify()

  def close(self, timeout: float | None = None) -> None:
    with self._cv:
      self._closing = True
      self._cv.notify()
    if self._thread.is_alive():
      self._thread.join(timeout)

  def busy(self) -> int:
    """Requests active or waiting."""
    return len(self.waiting) + sum(r is not None for r in self.rows)

  def _run(self) -> None:
    while True:
      with self._cv:
        while (not self._closing and not self.waiting and self._idle()
               and self._pending is None):
          self._cv.wait()
        if self._closing and not self.waiting and self._idle() and self._pending is None:
          return
        admitted = []
        for slot in range(self.model.slots):
          while self.rows[slot] is None and self.waiting:
            request = self.waiting.popleft()
            if request.cancelled:
              self.cancelled += 1
            else:
              self.rows[slot] = request
              admitted.append((slot, request))
      for slot, request in admitted:
        self._guard(self._admit, slot, request, only=slot)
      self._drop_cancelled()
      pending, self._pending = self._pending, None
      if not self._idle():
        self._guard(self._dispatch)
      if pending is not None:
        self._guard(self._collect, pending)

  def _idle(self) -> bool:
    return all(r is None for r in self.rows)

  def _guard(self, fn, *args, only: int | None = None) -> None:
    """A failure ends the requests it touched (slot `only`, else all) with an error, never the
    scheduler."""
    try:
      fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      logging.error("engine: %s", traceback.format_exc())
      for slot, request in enumerate(self.rows):
        if request is not None and only in (None, slot):
          request.sink(Finished("error", len(request.ids), request.generated,
                                message=f"{type(e).__name__}: {e}"))
          self._free(slot)

  def _admit(self, slot: int, request: Request) -> None:
    key = request_key(request.seed)
    first, prompt = self.model.prefill(slot, request.ids, key, request.settings, request.greedy,
                                       echo=request.echo)
    if prompt is not None:
      request.sink(Echo(prompt[0], prompt[1:]))
    if request.max_new <= 0:
      request.sink(Finished("length", len(request.ids), 0))
      self._free(slot)
      return
    self.row_state.set(slot, key, request.settings, request.greedy)
    self.positions[slot] = len(request.ids)
    request.dispatched = 1
    self._accept(slot, *first)

  def _dispatch(self) -> None:
    """Sends the next step of every row that still needs a token; its results are read on the
    next pass, after the step after it has been sent."""
    run = [(slot, r) for slot, r in enumerate(self.rows)
           if r is not None and r.dispatched < r.max_new]
    if not run:
      return
    positions = np.full_like(self.positions, -1)
    steps = np.zeros_like(self.positions)
    for slot, request in run:
      positions[slot], steps[slot] = self.positions[slot], request.dispatched
      self.positions[slot] += 1
      request.dispatched += 1
    self._pending = (self.model.step(positions, steps, self.row_state), run)

  def _collect(self, pending) -> None:
    out, run = pending
    tokens, logprobs, top_values, top_ids = jax.device_get(out)
    for slot, request in run:
      if self.rows[slot] is request:  # not ended (stop id, client gone) since it was sent
        self._accept(slot, tokens[slot], logprobs[slot], top_values[slot], top_ids[slot])

  def _accept(self, slot, token, logprob, top_values, top_ids) -> None:
    request = self.rows[slot]
    token = int(token)
    request.generated += 1
    at_stop_id = token in self.stop_ids and not request.ignore_eos
    text = "" if at_stop_id else request.tail.add(token)
    reason = None
    if at_stop_id or request.tail.stopped:
      reason = "stop"
    elif request.generated >= request.max_new:
      reason = "length"
    if reason and not request.tail.stopped:
      text += request.tail.finish()
    request.sink(Piece(token, text, float(logprob), (top_values, top_ids)))
    if reason:
      request.sink(Finished(reason, len(request.ids), request.generated))
      self._free(slot)

  def _drop_cancelled(self) -> None:
    for slot, request in enumerate(self.rows):
      if request is not None and request.cancelled:
        self.cancelled += 1
        self._free(slot)

  def _free(self, slot: int) -> None:
    self.rows[slot] = None
    self.positions[slot] = -1
