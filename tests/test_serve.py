"""`python -m lima_jax.serve` on a toy run, driven through the `openai` client and raw HTTP:
answers equal `python -m lima_jax.generate`'s, streams equal non-streamed answers, logprobs
equal our forward's log-softmax, and every malformed request gets OpenAI's error object."""

import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from helpers import ROOT
from lima_jax import generate, run_files
from serve_process import Server, forward_logprobs, tiny_run

NAME = "toy"
QUESTIONS = [["Say hello."], ["Hi", "Hello! How can I help?", "Name a colour."]]


def as_messages(turns):
  return [{"role": "assistant" if i % 2 else "user", "content": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_run(str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="module")
def server(run):
  s = Server(f"--workdir={run}", f"--served_model_name={NAME}", "--slots=4")
  yield s
  s.stop()


@pytest.fixture(scope="module")
def client(server):
  return server.client()


@pytest.fixture(scope="module")
def reference(run):
  """Our model in this process: (tokenizer, log-softmax of a forward over ids)."""
  kept = run_files.locate(run)
  source, tokenizer = generate.open_kept(kept)
  trainer, params = generate.restore_kept(kept, source)
  return tokenizer, forward_logprobs(trainer, params)


def chat(client, turns, **kwargs):
  return client.chat.completions.create(model=NAME, messages=as_messages(turns), **kwargs)


def test_greedy_answers_equal_the_generate_cli(run, client, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"conversations": q}) + "\n" for q in QUESTIONS))
  out = tmp_path / "answers.jsonl"
  proc = subprocess.run([sys.executable, "-m", "lima_jax.generate", f"--workdir={run}",
                         f"--prompts={prompts}", f"--out={out}", "--greedy", "--max_tokens=12"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  want = [json.loads(line) for line in out.read_text().splitlines()]
  for turns, record in zip(QUESTIONS, want):
    got = chat(client, turns, temperature=0, max_tokens=12, extra_body={"return_token_ids": True})
    choice = got.choices[0]
    assert choice.message.content == record["generation"]
    assert got.usage.completion_tokens == record["tokens"] == len(choice.token_ids)
    assert choice.finish_reason == {"eot": "stop", "length": "length"}[record["stopped"]]


def test_streamed_chunks_concatenate_to_the_answer(client):
  for kwargs in ({"temperature": 0}, {"seed": 7}, {"temperature": 1.0, "top_p": 0.8, "seed": 3}):
    whole = chat(client, QUESTIONS[1], max_tokens=20, **kwargs)
    chunks = list(chat(client, QUESTIONS[1], max_tokens=20, stream=True,
                       stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 20
  # A different seed samples a different answer; the same seed the same one.
  assert (chat(client, QUESTIONS[0], max_tokens=20, seed=1).choices[0].message.content !=
          chat(client, QUESTIONS[0], max_tokens=20, seed=2).choices[0].message.content)


def test_a_stop_string_cuts_the_answer_in_both_modes(client):
  full = chat(client, QUESTIONS[0], temperature=0, max_tokens=20).choices[0].message.content
  stop = full[len(full) // 2:len(full) // 2 + 2]
  want = full[:full.index(stop)]
  got = chat(client, QUESTIONS[0], temperature=0, max_tokens=20, stop=[stop])
  assert got.choices[0].message.content == want and got.choices[0].finish_reason == "stop"
  streamed = chat(client, QUESTIONS[0], temperature=0, max_tokens=20, stop=stop, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == want


def test_logprobs_are_our_forwards_log_softmax(client, reference):
  tokenizer, logprobs = reference
  got = chat(client, QUESTIONS[1], temperature=0, max_tokens=8, logprobs=True, top_logprobs=5,
             extra_body={"return_token_ids": True})
  prompt = tokenizer.encode_prompt(QUESTIONS[1])
  answer = got.choices[0].token_ids
  table = logprobs(list(prompt) + answer)
  for i, (token, entry) in enumerate(zip(answer, got.choices[0].logprobs.content)):
    row = table[len(prompt) - 1 + i]
    np.testing.assert_allclose(entry.logprob, row[token], atol=1e-4)
    np.testing.assert_allclose([t.logprob for t in entry.top_logprobs],
                               np.sort(row)[::-1][:5], atol=1e-4)
    assert entry.top_logprobs[0].logprob >= entry.logprob  # the penalty may pass over the top


def test_completion_echo_gives_the_prompts_logprobs(client, reference):
  tokenizer, logprobs = reference
  text = "The quick brown fox jumps over the lazy dog."
  got = client.completions.create(model=NAME, prompt=text, max_tokens=2, echo=True, logprobs=3,
                                  temperature=0)
  choice = got.choices[0]
  ids = [tokenizer.bos_id] + tokenizer.backend.encode(text)
  assert choice.text.startswith(text) and got.usage.prompt_tokens == len(ids)
  table = logprobs(ids)
  assert choice.logprobs.token_logprobs[0] is None
  want = [table[i - 1, ids[i]] for i in range(1, len(ids))]
  np.testing.assert_allclose(choice.logprobs.token_logprobs[1:len(ids)], want, atol=1e-4)
  np.testing.assert_allclose(sorted(choice.logprobs.top_logprobs[1].values(), reverse=True),
                             np.sort(table[0])[::-1][:3], atol=1e-4)
  # lm-evaluation-harness sends ids: the same numbers.
  by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=1, echo=True,
                                     logprobs=1, temperature=0)
  np.testing.assert_allclose(by_ids.choices[0].logprobs.token_logprobs[1:len(ids)], want,
                             atol=1e-4)


def test_models_health_and_the_runs_decoding_defaults(server, client):
  assert [m.id for m in client.models.list().data] == [NAME]
  assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
  # Omitted fields are the run's generate.* (the paper's: temperature 0.7, top_p 0.9, penalty
  # 1.2, seed 0), not OpenAI's defaults.
  default = chat(client, QUESTIONS[0], max_tokens=16).choices[0].message.content
  explicit = chat(client, QUESTIONS[0], max_tokens=16, temperature=0.7, top_p=0.9, seed=0,
                  extra_body={"repetition_penalty": 1.2}).choices[0].message.content
  assert default == explicit
  openai_default = chat(client, QUESTIONS[0], max_tokens=16, temperature=1.0, top_p=1.0, seed=0,
                        extra_body={"repetition_penalty": 1.0})
  assert default != openai_default.choices[0].message.content


BAD = {
    "not json": (b"{'model': 'toy'", 400),
    "not an object": (b"[1, 2]", 400),
    "oversized": (b'{"model": "toy", "messages": [], "pad": "' + b"x" * (5 << 20) + b'"}', 413),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
    "messages not a list": ({"model": NAME, "messages": "hi"}, 400),
    "no messages": ({"model": NAME, "messages": []}, 400),
    "roles out of order": ({"model": NAME, "messages": [{"role": "assistant", "content": "a"},
                                                        {"role": "user", "content": "b"}]}, 400),
    "two user turns": ({"model": NAME, "messages": [{"role": "user", "content": "a"},
                                                    {"role": "user", "content": "b"}]}, 400),
    "ends with assistant": ({"model": NAME, "messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]},
                            400),
    "empty content": ({"model": NAME, "messages": [{"role": "user", "content": "  "}]}, 400),
    "unknown role": ({"model": NAME, "messages": [{"role": "wizard", "content": "a"}]}, 400),
    "prompt too long": ({"model": NAME, "messages": [{"role": "user", "content": "word " * 300}]},
                        400),
    "max_tokens above the context": ({"model": NAME, "max_tokens": 500,
                                      "messages": [{"role": "user", "content": "a"}]}, 400),
    "n = 2": ({"model": NAME, "n": 2, "messages": [{"role": "user", "content": "a"}]}, 400),
    "temperature a string": ({"model": NAME, "temperature": "hot",
                              "messages": [{"role": "user", "content": "a"}]}, 400),
}


def test_malformed_requests_get_openai_error_objects(server, client):
  for case, (body, status) in BAD.items():
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == status, (case, reply.text)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], case
  bad_ids = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": [10 ** 9]})
  assert bad_ids.status_code == 400 and "vocabulary" in bad_ids.json()["error"]["message"]
  assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["code"] == "not_found"
  with pytest.raises(openai.BadRequestError, match="max_tokens"):
    chat(client, QUESTIONS[0], max_tokens=10 ** 6)
  assert chat(client, QUESTIONS[0], max_tokens=2).usage.completion_tokens == 2  # still serving


def test_a_long_answer_does_not_block_a_new_request(client):
  """A short request that arrives while a long answer streams ends while the long one goes on:
  it took a free slot at once, not the long answer's end."""
  ended = {}

  def short_answer():
    chat(client, QUESTIONS[1], max_tokens=3, temperature=0)
    ended["short"] = time.monotonic()

  warm = threading.Thread(target=short_answer)  # compiles two-row steps before timing anything
  warm.start()
  chat(client, QUESTIONS[0], max_tokens=100, temperature=0)
  warm.join()
  ended.clear()
  after_short = 0
  short = threading.Thread(target=short_answer)
  for i, _ in enumerate(chat(client, QUESTIONS[0], max_tokens=100, temperature=0, stream=True)):
    if i == 3:
      short.start()
    after_short += "short" in ended
  short.join()
  assert after_short > 10, after_short


def test_a_judge_request_reads_one_tokens_top_logprobs(client, reference):
  """An LLM judge's call: a system message, temperature 0, one token, its top_logprobs. The
  system text opens the first user turn (LIMA's format has no system role)."""
  tokenizer, logprobs = reference
  got = client.chat.completions.create(
      model=NAME, temperature=0, max_tokens=1, logprobs=True, top_logprobs=5,
      messages=[{"role": "system", "content": "You are a careful judge."},
                {"role": "user", "content": "Which answer is better, A or B?"}])
  (entry,) = got.choices[0].logprobs.content
  row = logprobs(tokenizer.encode_prompt(["You are a careful judge.\n\nWhich answer is better, "
                                          "A or B?"]))[-1]
  np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], np.sort(row)[::-1][:5],
                             atol=1e-4)
  assert entry.token == entry.top_logprobs[0].token and got.choices[0].finish_reason in (
      "length", "stop")
  assert got.usage.completion_tokens == 1


def test_a_client_gone_from_a_non_streamed_request_frees_its_slots(server):
  """256 answers of 100 tokens in one /v1/completions request (about 3,200 decode steps on the
  server's slots, several seconds even for the toy); the client gives up after a second, and its
  answers leave the engine at once instead of decoding to the end."""
  before = httpx.get(f"{server.url}/health").json()["cancelled"]
  body = {"model": NAME, "prompt": ["Say hello."] * 256, "max_tokens": 100, "temperature": 0,
          "ignore_eos": True}
  with pytest.raises(httpx.TimeoutException):
    httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
  deadline = time.monotonic() + 30
  while (health := httpx.get(f"{server.url}/health").json())["requests"] and (
      time.monotonic() < deadline):
    time.sleep(0.1)
  assert health["requests"] == 0 and health["cancelled"] - before >= 200, health
  assert httpx.post(f"{server.url}/v1/completions", timeout=60, json=dict(
      body, prompt="Say hello.", max_tokens=2)).json()["usage"]["completion_tokens"] == 2
