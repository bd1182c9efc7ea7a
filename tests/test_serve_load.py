"""`python -m lima_jax.serve` under load and at its edges, on a toy run: 64 concurrent requests
(8 malformed, 4 leaving mid-stream) on 8 slots, the API key, and SIGTERM's drain."""

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from serve_process import Server, tiny_run

NAME = "toy"
KEY = "sesame"
QUESTIONS = ["Say hello.", "Name a colour.", "What is two plus two?", "Write a short poem."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  run = tiny_run(str(tmp_path_factory.mktemp("run")))
  s = Server(f"--workdir={run}", f"--served_model_name={NAME}", "--slots=8", api_key=KEY)
  yield s
  s.stop()


def messages(question):
  return [{"role": "user", "content": question}]


async def answer(client, question, mode, stream):
  """(text, finish_reason, completion tokens) of one well-formed request."""
  kwargs = {"temperature": 0} if mode == "greedy" else {"seed": mode}
  if mode == "completion":
    got = await client.completions.create(model=NAME, prompt=question, max_tokens=24,
                                          temperature=0)
    return got.choices[0].text, got.choices[0].finish_reason, got.usage.completion_tokens
  if not stream:
    got = await client.chat.completions.create(model=NAME, messages=messages(question),
                                               max_tokens=24, **kwargs)
    return got.choices[0].message.content, got.choices[0].finish_reason, got.usage.completion_tokens
  chunks = [c async for c in await client.chat.completions.create(
      model=NAME, messages=messages(question), max_tokens=24, stream=True,
      stream_options={"include_usage": True}, **kwargs)]
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
  return text, reason, chunks[-1].usage.completion_tokens


async def leave_mid_stream(client):
  stream = await client.chat.completions.create(model=NAME, messages=messages("Tell a story."),
                                                max_tokens=100, temperature=0, stream=True)
  async for _ in stream:
    break
  await stream.close()


MALFORMED = [b"not json", b'{"model": "toy"}', b'{"model": "other", "messages": []}',
             json.dumps({"model": NAME, "messages": [{"role": "bot", "content": "x"}]}).encode(),
             json.dumps({"model": NAME, "messages": [{"role": "user", "content": ""}]}).encode(),
             json.dumps({"model": NAME, "n": 3, "messages": messages("x")}).encode(),
             json.dumps({"model": NAME, "max_tokens": 4096, "messages": messages("x")}).encode(),
             json.dumps({"model": NAME, "messages": messages("x"), "top_p": 7}).encode()]


async def malformed(http, body):
  reply = await http.post("/v1/chat/completions", content=body,
                          headers={"authorization": f"Bearer {KEY}",
                                   "content-type": "application/json"})
  return reply.status_code, reply.json()


def test_64_concurrent_requests_some_malformed_some_leaving(server):
  cases = [(q, mode, stream) for q in QUESTIONS for mode in ("greedy", 5, "completion")
           for stream in (False, True)][:20]
  cases = (cases * 3)[:52]

  async def main():
    client = server.async_client()
    alone = {}
    for case in set(cases):  # each answer alone first: the reference for the crowd
      alone[case] = await answer(client, *case)
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
      jobs = ([answer(client, *case) for case in cases] +
              [malformed(http, body) for body in MALFORMED] +
              [leave_mid_stream(client) for _ in range(4)])
      order = list(range(len(jobs)))
      order = order[::3] + order[1::3] + order[2::3]  # bad and leaving ones spread through
      results = await asyncio.gather(*(jobs[i] for i in order))
      by_job = dict(zip(order, results))
      health = (await http.get("/health")).json()
    return alone, [by_job[i] for i in range(len(jobs))], health

  alone, results, health = asyncio.run(main())
  for case, got in zip(cases, results[:52]):
    assert got == alone[case], case
    assert got[2] == 24 or got[1] == "stop"
  for status, body in results[52:60]:
    assert 400 <= status < 500 and set(body["error"]) == {"message", "type", "param", "code"}
  assert health["status"] == "ok" and health["cancelled"] >= 4
  deadline = time.monotonic() + 30
  while httpx.get(f"{server.url}/health").json()["requests"] and time.monotonic() < deadline:
    time.sleep(0.2)
  assert httpx.get(f"{server.url}/health").json()["requests"] == 0  # every slot free again
  client = server.client()
  assert client.chat.completions.create(model=NAME, messages=messages("Hi"),
                                        max_tokens=2).usage.completion_tokens == 2


def test_the_api_key_is_required(server):
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
  reply = httpx.get(f"{server.url}/v1/models")
  assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
  assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
  assert [m.id for m in server.client().models.list().data] == [NAME]


def test_sigterm_finishes_the_answers_in_flight_then_exits(server):
  client = server.client()
  stream = client.chat.completions.create(model=NAME, messages=messages("Tell a story."),
                                          max_tokens=100, temperature=0, stream=True)
  chunks = [next(iter(stream))]
  server.proc.send_signal(signal.SIGTERM)
  time.sleep(1.0)
  with pytest.raises(httpx.HTTPError):  # no new connection is taken
    httpx.get(f"{server.url}/health", timeout=5)
  chunks += list(stream)
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
  assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 10
  out, _ = server.proc.communicate(timeout=120)  # it exits by itself: no second signal
  assert server.proc.returncode == 0, out
  assert "server stopped" in out
