"""The OpenAI-compatible routes on FastAPI: /health, /v1/models, /v1/chat/completions and
/v1/completions, non-streamed or as server-sent events (`data: {chunk}` ... `data: [DONE]`).

Every request's ids come from the engine's tokenizer: chat messages in the run's chat format
(`ChatTokenizer.encode_prompt`, as training formats them), completion prompts as plain text.
A request whose client goes away, streamed or not, is cancelled, so its slot goes to the next
request.
"""

import asyncio
import hmac
import json
import time
import uuid

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from lima_jax.serve import errors
from lima_jax.serve import requests as bodies
from lima_jax.serve.engine import Echo, Engine, EngineClosed, Finished, Piece
from lima_jax.serve.engine import Request as Job
from lima_jax.serve.errors import APIError

MAX_BODY_BYTES = 4 << 20  # 4 MiB: far above any prompt that fits a context of 2,048 tokens
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is there


class TokenText:
  """A token's text as logprobs show it: its decoded text, or for a special token (BOS, EOT,
  padding rows) its name."""

  def __init__(self, tokenizer):
    self.tokenizer, self._cache = tokenizer, {}

  def __call__(self, token: int) -> str:
    token = int(token)
    if token not in self._cache:
      t = self.tokenizer
      if token == t.eot_id:
        text = t.eot_text
      elif token >= t.token_count or token == t.bos_id:
        text = t.token_text(token) if token < t.token_count else f"<|id {token}|>"
      else:
        text = t.decode([token])
      self._cache[token] = text
    return self._cache[token]


def create_app(engine: Engine, *, name: str, context: int, defaults: dict,
               api_key: str = "", max_body: int = MAX_BODY_BYTES) -> FastAPI:
  """The app serving `engine` as model `name`; with `api_key`, /v1 needs `Authorization: Bearer
  <api_key>`. `defaults`: the run's generate.* settings."""
  app = FastAPI(title="lima_jax", docs_url=None, redoc_url=None, openapi_url=None)
  errors.install(app)
  tokenizer = engine.tokenizer
  token_text = TokenText(tokenizer)
  created = int(time.time())

  async def authorized(request: Request) -> None:
    if not api_key:
      return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
      raise APIError(401, "invalid API key: send it as `Authorization: Bearer <key>`",
                     code="invalid_api_key")

  async def read(request: Request, model_class):
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body:
      raise APIError(413, f"the body is {length} bytes; at most {max_body}")
    raw = bytearray()
    async for chunk in request.stream():
      raw += chunk
      if len(raw) > max_body:
        raise APIError(413, f"the body exceeds {max_body} bytes")
    body = bodies.parse(model_class, bytes(raw))
    if body.model != name:
      raise APIError(404, f"model {body.model!r} does not exist; this server serves {name!r}",
                     param="model", code="model_not_found")
    return body

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": name, "requests": engine.busy(),
            "cancelled": engine.cancelled}

  @app.get("/v1/models", dependencies=[Depends(authorized)])
  async def models():
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "lima_jax", "max_model_len": context}]}

  @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
  async def chat(request: Request):
    body = await read(request, bodies.ChatBody)
    turns = body.turns()
    ids = tokenizer.encode_prompt(turns)
    limit = bodies.answer_budget(len(ids), body.answer_limit(), context, defaults["max_tokens"],
                                 prompt_param="messages", param="max_tokens")
    top = body.top_logprobs or 0
    if top and not body.logprobs:
      raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    run = _Run(engine, [_job(body, ids, limit, defaults)])
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}

    def logprob_entry(piece: Piece) -> dict:
      entry = _token_entry(token_text(piece.token), piece.logprob)
      values, ids_ = piece.top
      entry["top_logprobs"] = [_token_entry(token_text(i), v)
                               for v, i in zip(values[:top], ids_[:top])]
      return entry

    if body.stream:
      usage = (body.stream_options or {}).get("include_usage", False)
      return _sse(run, lambda: _chat_chunks(run, meta, body.logprobs, logprob_entry, usage))
    await run.wait(request)
    (pieces, done), = run.results()
    message = {"role": "assistant", "content": "".join(p.text for p in pieces)}
    choice = {"index": 0, "message": message, "finish_reason": done.reason,
              "logprobs": ({"content": [logprob_entry(p) for p in pieces]}
                           if body.logprobs else None)}
    if body.return_token_ids:
      choice["token_ids"] = [p.token for p in pieces]
    out = dict(meta, object="chat.completion", choices=[choice], usage=_usage([done]))
    if body.return_token_ids:
      out["prompt_token_ids"] = ids.tolist()
    return out

  @app.post("/v1/completions", dependencies=[Depends(authorized)])
  async def completions(request: Request):
    body = await read(request, bodies.CompletionBody)
    prompts = body.prompts()
    all_ids = [bodies.completion_ids(p, tokenizer) for p in prompts]
    jobs = [_job(body, ids, bodies.answer_budget(len(ids), body.max_tokens, context,
                                                 defaults["max_tokens"], prompt_param="prompt",
                                                 param="max_tokens"), defaults, echo=body.echo)
            for ids in all_ids]
    run = _Run(engine, jobs)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    k = body.logprobs

    def logprobs_of(tokens, values, tops) -> dict:
      strings = [token_text(t) for t in tokens]
      return {"tokens": strings, "token_logprobs": values,
              "top_logprobs": [None if top is None else
                               {token_text(i): float(v) for v, i in zip(top[0][:k], top[1][:k])}
                               for top in tops],
              "text_offset": np.cumsum([0] + [len(s) for s in strings[:-1]]).tolist()}

    if body.stream:
      if body.echo:
        raise APIError(400, "echo: not with stream", param="echo")
      return _sse(run, lambda: _completion_chunks(run, meta, k, logprobs_of))
    await run.wait(request)
    choices = []
    for index, ((pieces, done), ids, prompt) in enumerate(zip(run.results(), all_ids, prompts)):
      text = "".join(p.text for p in pieces)
      tokens = [p.token for p in pieces]
      values = [p.logprob for p in pieces]
      tops = [p.top for p in pieces]
      if body.echo:
        echo = run.echoes[index]
        text = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) + text
        tokens = ids.tolist() + tokens
        values = [None] + [float(v) for v in echo.logprobs] + values
        tops = [None] + list(zip(*echo.top)) + tops
      choices.append({"index": index, "text": text, "finish_reason": done.reason,
                      "logprobs": logprobs_of(tokens, values, tops) if k is not None else None})
    return dict(meta, object="text_completion", choices=choices, usage=_usage(run.done))

  return app


def _job(body, ids, limit, defaults, echo=False) -> Job:
  settings, greedy, seed = bodies.decoding(body, defaults)
  return Job(ids=ids, settings=settings, greedy=greedy, seed=seed, max_new=limit,
             sink=None, stop=body.stops(), echo=echo, ignore_eos=body.ignore_eos)


class _Run:
  """Jobs handed to the engine, their events gathered on the event loop as (index, event)."""

  def __init__(self, engine: Engine, jobs: list[Job]):
    self.jobs, self.loop = jobs, asyncio.get_running_loop()
    self.events: asyncio.Queue = asyncio.Queue()
    self.pieces = [[] for _ in jobs]
    self.echoes: list[Echo | None] = [None] * len(jobs)
    self.done: list[Finished | None] = [None] * len(jobs)
    for index, job in enumerate(jobs):
      job.sink = self._sink(index)
    try:
      for job in jobs:
        engine.submit(job)
    except EngineClosed as e:
      self.cancel()
      raise APIError(503, str(e), kind="server_error", code="shutting_down") from None

  def _sink(self, index):
    def put(event):
      try:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
      except RuntimeError:  # the loop is gone: nobody is listening
        self.jobs[index].cancel()
    return put

  def cancel(self) -> None:
    for job in self.jobs:
      job.cancel()

  async def _watch(self, request: Request) -> None:
    while not await request.is_disconnected():
      await asyncio.sleep(DISCONNECT_POLL_S)
    self.cancel()
    self.events.put_nowait((None, None))  # wakes `wait`

  async def next(self):
    """The next (index, event), recorded; None once every job has finished."""
    if all(d is not None for d in self.done):
      return None
    index, event = await self.events.get()
    if index is None:
      raise APIError(499, "the client closed the connection", code="client_closed_request")
    if isinstance(event, Piece):
      self.pieces[index].append(event)
    elif isinstance(event, Echo):
      self.echoes[index] = event
    elif isinstance(event, Finished):
      self.done[index] = event
    return index, event

  async def wait(self, request: Request) -> None:
    """Gathers every event; a client that goes away meanwhile cancels the jobs (their slots
    free before the next step) and ends the request with 499."""
    watcher = asyncio.create_task(self._watch(request))
    try:
      while await self.next() is not None:
        pass
    except asyncio.CancelledError:
      self.cancel()
      raise
    finally:
      watcher.cancel()
    failed = [d for d in self.done if d.reason == "error"]
    if failed:
      raise APIError(500, f"generation failed: {failed[0].message}", kind="server_error")

  def results(self):
    return list(zip(self.pieces, self.done))


def _token_entry(text: str, logprob: float) -> dict:
  return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}


def _usage(done) -> dict:
  prompt = sum(d.prompt_tokens for d in done)
  completion = sum(d.completion_tokens for d in done)
  return {"prompt_tokens": prompt, "completion_tokens": completion,
          "total_tokens": prompt + completion}


def _sse(run: _Run, chunks) -> StreamingResponse:
  """Server-sent events; a client that goes away cancels the run (its slots free at once)."""
  async def stream():
    try:
      async for chunk in chunks():
        yield f"data: {chunk}\n\n"
      yield "data: [DONE]\n\n"
    finally:
      run.cancel()
  return StreamingResponse(stream(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})


def _json(value) -> str:
  return json.dumps(value, ensure_ascii=False)


async def _chat_chunks(run: _Run, meta: dict, logprobs: bool, entry, usage: bool):
  chunk = lambda delta, **kw: _json(dict(meta, object="chat.completion.chunk", choices=[
      dict({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}, **kw)]))
  yield chunk({"role": "assistant", "content": ""})
  while (item := await run.next()) is not None:
    _, event = item
    if isinstance(event, Piece) and (event.text or logprobs):
      yield chunk({"content": event.text},
                  logprobs={"content": [entry(event)]} if logprobs else None)
    elif isinstance(event, Finished):
      if event.reason == "error":
        yield _json(errors.error_body(f"generation failed: {event.message}", "server_error"))
        return
      yield chunk({}, finish_reason=event.reason)
  if usage:
    yield _json(dict(meta, object="chat.completion.chunk", choices=[], usage=_usage(run.done)))


async def _completion_chunks(run: _Run, meta: dict, k, logprobs_of):
  while (item := await run.next()) is not None:
    index, event = item
    choice = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
    if isinstance(event, Piece):
      choice.update(text=event.text, logprobs=None if k is None else
                    logprobs_of([event.token], [event.logprob], [event.top]))
    elif isinstance(event, Finished):
      if event.reason == "error":
        yield _json(errors.error_body(f"generation failed: {event.message}", "server_error"))
        return
      choice["finish_reason"] = event.reason
    else:
      continue
    yield _json(dict(meta, object="text_completion", choices=[choice]))
