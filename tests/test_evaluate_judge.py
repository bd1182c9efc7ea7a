"""`python -m lima_jax.evaluate judge` against a small OpenAI-compatible endpoint started here,
whose replies each test scripts: verdicts from logprobs and from text, both orders, 429 / 500 /
timeouts / unparseable replies, a run killed half way and rerun; then against a real
`python -m lima_jax.serve` on the SmolLM2-135M import."""

import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lima_jax.evaluate import protocol
from serve_process import Server  # tests/: the serving tests' real server process
from tests.evaluate_helpers import ENV, ROOT, database, evaluate, free_port, make_study

N = 6
PROMPTS = [f"Question number {i}: how do I do thing {i}?" for i in range(N)]
SYSTEMS = {"lima": [f"LIMA answer {i}" for i in range(N)],
           "base": [f"Base answer {i}" for i in range(N)]}


class Endpoint:
  """chat/completions whose reply to (item, which system is shown first) a test chooses."""

  def __init__(self):
    self.reply = lambda item, lima_first, attempt, body: _letter("N")
    self.log = []  # (item, lima_first, mode) per request, in arrival order
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}/v1"
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
      body = await request.json()
      text = body["messages"][-1]["content"]
      item = int(re.search(r"Question number (\d+)", text)[1])
      mode = "pairwise" if "[Response B]" in text else "rating"
      key = (item, "[Response A]\nLIMA" in text, mode)
      attempt = sum(k == key for k in self.log)
      self.log.append(key)
      reply = self.reply(item, key[1], attempt, body)
      if isinstance(reply, float):  # a delay: the client times out first
        await asyncio.sleep(reply)
        reply = _letter("A")
      if isinstance(reply, int):
        return JSONResponse({"error": {"message": "scripted"}}, status_code=reply)
      return reply

    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.05)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)


def _letter(text, logprobs=None):
  """A chat/completions reply: `text`, and `logprobs` ({token: logprob}) at its first token."""
  choice = {"index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": "stop"}
  if logprobs:
    top = [{"token": t, "logprob": lp} for t, lp in logprobs.items()]
    choice["logprobs"] = {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                       "top_logprobs": top}]}
  return {"id": "x", "object": "chat.completion", "model": "scripted", "choices": [choice]}


@pytest.fixture(scope="module")
def endpoint():
  server = Endpoint()
  yield server
  server.stop()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  return make_study(str(tmp_path_factory.mktemp("judge")), PROMPTS, SYSTEMS, shared=N)


@pytest.fixture
def study(made, tmp_path):
  """A fresh copy of the module's study (made once through the CLI) for each test."""
  return shutil.copytree(made, os.path.join(tmp_path, "study"))


def _judge(study, endpoint, *flags, check=True):
  return evaluate("judge", f"--study={study}", "--system=lima", "--against=base",
                  f"--endpoint={endpoint.url}", "--model=scripted", "--backoff=0.05",
                  "--timeout=2", *flags, check=check)


def _rows(study, *columns, where="1"):
  with database(study) as db:
    return db.execute(f"SELECT {', '.join(columns)} FROM judgements WHERE {where} "
                      "ORDER BY item, ord").fetchall()


def test_verdicts_from_logprobs_and_text_in_both_orders(study, endpoint):
  # Items 0-1: the judge prefers lima in both orders (logprobs); 2: base (text only, with a
  # chatty reply); 3: position bias, always "A" (the orders disagree: a tie); 4: neither; 5:
  # the likeliest token is no choice at all, the likeliest choice among the rest is lima's.
  def reply(item, lima_first, attempt, body):
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    lima, base = ("A", "B") if lima_first else ("B", "A")
    return {0: _letter(lima, {lima: -0.1, base: -2.5, "N": -4.0}),
            1: _letter(base, {base: -0.9, lima: -0.6}),  # two tokens' mass: lima still wins
            2: _letter(f"{base}. It is clearer."),
            3: _letter("A", {"A": -0.2, "B": -1.8}),
            4: _letter("N", {"N": -0.05, "A": -3.0}),
            5: _letter("The", {"The": -0.1, lima: -3.0, base: -4.0})}[item]
  endpoint.reply, endpoint.log = reply, []
  out = _judge(study, endpoint).stdout
  assert "10 verdicts from logprobs, 2 from text, 0 failed" in out
  # Both orders of every pair were asked, once each.
  assert collections.Counter(endpoint.log) == {(i, first, "pairwise"): 1 for i in range(N)
                                               for first in (True, False)}
  verdicts = _rows(study, "item", "ord", "verdict", "how")
  assert [(i, o, v) for i, o, v, _ in verdicts] == [
      (0, 0, "lima"), (0, 1, "lima"), (1, 0, "lima"), (1, 1, "lima"), (2, 0, "base"),
      (2, 1, "base"), (3, 0, "lima"), (3, 1, "base"), (4, 0, "tie"), (4, 1, "tie"),
      (5, 0, "lima"), (5, 1, "lima")]
  assert {h for *_, h in verdicts if _[0] == 2} == {"text"}
  evaluate("report", f"--study={study}")
  with open(os.path.join(study, "report.json"), encoding="utf-8") as f:
    (row,) = json.load(f)["pairwise"]
  assert row["rater"] == "judge:scripted" and row["n"] == N
  # Wins 0, 1, 5; loss 2; ties 3 (orders disagree) and 4.
  assert (row["win"], row["tie"], row["loss"]) == pytest.approx((3 / N, 2 / N, 1 / N))
  assert row["orders_disagree"] == pytest.approx(1 / N)  # item 3's position bias
  # A rerun finds nothing left to ask.
  endpoint.log = []
  assert "12 judged before" in _judge(study, endpoint).stdout and not endpoint.log


def test_failures_are_retried_or_recorded_never_verdicts(study, endpoint):
  # 0: 429 then fine; 1: 500 every time; 2: a timeout, then fine; 3: unparseable text and no
  # choice among the logprobs; 4: 400 (not retried); 5: fine.
  def reply(item, lima_first, attempt, body):
    fine = _letter("A", {"A": -0.1})
    if item == 0:
      return 429 if attempt == 0 else fine
    if item == 1:
      return 500
    if item == 2:
      return 5.0 if attempt == 0 else fine
    if item == 3:
      return _letter("Both answers have merits.", {"Both": -0.1, "The": -1.0})
    return 400 if item == 4 else fine
  endpoint.reply, endpoint.log = reply, []
  out = _judge(study, endpoint, "--retries=2").stdout
  assert "6 verdicts from logprobs, 0 from text, 6 failed" in out
  assert "2 of the failures: " in out  # why, in the endpoint's own words where it gives them
  rows = _rows(study, "item", "status", "verdict", "attempts", "error")
  assert [(i, s, v is not None) for i, s, v, *_ in rows] == [
      (i, s, s == "ok") for i in range(N) for s in
      [{0: "ok", 1: "failed", 2: "ok", 3: "failed", 4: "failed", 5: "ok"}[i]] * 2]
  by_item = {i: (a, e) for i, s, v, a, e in rows}
  assert by_item[0][0] == 2 and by_item[2][0] == 2  # retried once each
  assert by_item[1] == (3, "HTTP 500: scripted") and by_item[4] == (1, "HTTP 400: scripted")
  assert by_item[3][1].startswith("unparseable reply: 'Both answers")
  with database(study) as db:
    calls = db.execute("SELECT item, status, reply, error FROM calls ORDER BY id").fetchall()
  assert len(calls) == len(endpoint.log) == 20  # every attempt, timed out or not
  assert sum(1 for c in calls if c[0] == 2 and (c[3] or "").startswith("timeout")) == 2
  assert all(json.loads(c[2])["choices"] for c in calls if c[1] == 200)
  evaluate("report", f"--study={study}")
  with open(os.path.join(study, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["pairwise"][0]["n"] == 3  # items 0, 2 and 5 only
  assert report["judge_failures"] == {"judge:scripted": 6}
  # A rerun retries only what failed.
  endpoint.reply, endpoint.log = (lambda *a: _letter("N", {"N": -0.1})), []
  assert "6 judged before" in _judge(study, endpoint).stdout
  assert sorted({i for i, *_ in endpoint.log}) == [1, 3, 4]
  assert all(s == "ok" for (s,) in _rows(study, "status"))


def test_killed_run_resumes_without_judging_twice(study, endpoint):
  endpoint.log = []
  endpoint.reply = lambda *a: 0.4  # "A" after 0.4 s: the kill lands while some are in flight
  proc = subprocess.Popen([sys.executable, "-m", "lima_jax.evaluate", "judge",
                           f"--study={study}", "--system=lima", "--against=base",
                           f"--endpoint={endpoint.url}", "--model=scripted",
                           "--concurrency=2"], cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while len(_rows(study, "item")) < 4 and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before = _rows(study, "item", "ord", "status")
  assert 4 <= len(before) < 2 * N
  asked = collections.Counter(endpoint.log)
  _judge(study, endpoint)
  rows = _rows(study, "item", "ord", "status")
  assert sorted((i, o) for i, o, _ in rows) == [(i, o) for i in range(N) for o in (0, 1)]
  assert {s for *_, s in rows} == {"ok"}
  # What had a verdict before the kill was not asked again.
  again = collections.Counter(endpoint.log) - asked
  for item, ord_, _ in before:
    assert again[(item, ord_ == 0, "pairwise")] == 0


def test_rating_modes_and_cli_errors(study, endpoint):
  endpoint.reply = lambda item, lima_first, attempt, body: _letter(
      "E" if "Excellent" in body["messages"][0]["content"] else str(item % 6 + 1))
  _judge(study, endpoint, "--mode=absolute", "--no_logprobs")
  _judge(study, endpoint, "--mode=helpfulness", "--no_logprobs")
  evaluate("report", f"--study={study}")
  with open(os.path.join(study, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  # The rating modes rate --system's and --against's answers alike.
  assert [(r["system"], r["rater"], r["n"], r["excellent"]) for r in report["absolute"]] == [
      ("base", "judge:scripted", N, 1.0), ("lima", "judge:scripted", N, 1.0)]
  for helpful in report["helpfulness"]:
    assert helpful["mean"] == pytest.approx(3.5) and helpful["ci"][0] < 3.5 < helpful["ci"][1]
  bad = _judge(study, endpoint, "--mode=pairwise", "--against=gpt4", check=False)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip() == (f"error: --against=gpt4: no such system in {study} "
                                "(systems: base, lima)")


@pytest.fixture(scope="module")
def smollm2(smollm2_import):
  return smollm2_import


def test_add_generates_and_lima_jax_serve_judges(tmp_path, smollm2):
  """The acceptance path on the cached SmolLM2-135M import: `add --model` generates two samples
  per prompt with generate's sampler; `python -m lima_jax.serve` on the same model is the local
  judge: every verdict read from logprobs, both orders of every pair, one verdict each."""
  prompts = ["What is the capital of France?", "Name a prime number.", "Say hello."]
  study = make_study(str(tmp_path), prompts, {
      "tuned": ["Paris is the capital of France.", "7 is prime.", "Hello!"],
      "base": ["I like turtles.", "Bananas are yellow.", "Goodbye."]}, shared=3)
  out = evaluate("add", f"--study={study}", "--system=smol", f"--model={smollm2}",
                 "--chat_format=template", "--eot_token=<|im_end|>", "--samples=2",
                 "--max_tokens=6").stdout
  assert "6 answers of smol to 3 prompts" in out
  with database(study) as db:
    answers = db.execute("SELECT item, sample, text FROM answers WHERE system = 'smol' "
                         "ORDER BY item, sample").fetchall()
  assert [(i, s) for i, s, _ in answers] == [(i, s) for i in range(3) for s in (0, 1)]
  assert all(text.strip() for *_, text in answers)
  assert any(answers[2 * i][2] != answers[2 * i + 1][2] for i in range(3))  # seeds differ
  with open(os.path.join(study, "generated", "smol_seed0.jsonl"),
            encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [r["prompt"] for r in records] == prompts and all(r["tokens"] <= 6 for r in records)

  server = Server(f"--model={smollm2}", "--chat_format=template", "--eot_token=<|im_end|>",
                  "--slots=2", "--context=512")
  try:
    out = evaluate("judge", f"--study={study}", "--system=tuned", "--against=base",
                   f"--endpoint={server.url}/v1", "--model=smollm2-135m-instruct",
                   "--max_tokens=1").stdout
  finally:
    server.stop()
  assert "6 verdicts from logprobs, 0 from text, 0 failed" in out
  with database(study) as db:
    rows = db.execute("SELECT item, ord, status, verdict, how FROM judgements "
                      "ORDER BY item, ord").fetchall()
    requests = [json.loads(r) for (r,) in db.execute("SELECT request FROM calls")]
  assert [(i, o) for i, o, *_ in rows] == [(i, o) for i in range(3) for o in (0, 1)]
  assert all(s == "ok" and v in ("tuned", "base", "tie") and h == "logprobs"
             for _, _, s, v, h in rows)
  # The two orders of a pair show the answers swapped.
  first = [r["messages"][-1]["content"] for r in requests]
  assert sum("[Response A]\nParis" in t for t in first) == 1
  assert sum("[Response B]\nParis" in t for t in first) == 1


@pytest.mark.parametrize("mode, text, value", [
    ("pairwise", "A", "left"), ("pairwise", " **B**. Because...", "right"),
    ("pairwise", "Neither is better", "tie"), ("pairwise", "N", "tie"),
    ("pairwise", "Both are fine", None), ("pairwise", "", None), ("pairwise", "C", None),
    ("absolute", "Excellent: it answers fully", "excellent"), ("absolute", "F", "fail"),
    ("helpfulness", "5", "5"), ("helpfulness", "7", None), ("helpfulness", "4/6", None),
])
def test_reply_text_parsing(mode, text, value):
  assert protocol.parse_reply(mode, text) == value
