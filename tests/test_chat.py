"""`python -m lima_jax.chat` through its real command line: a multi-turn conversation typed on
stdin, decoding changed with /set, saved with /save as a GAIR/lima record whose greedy answers
are the generate CLI's for the same history."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT
from serve_process import one_device_env, tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_run(str(tmp_path_factory.mktemp("run")))


def chat(run, lines):
  return subprocess.run([sys.executable, "-m", "lima_jax.chat", f"--workdir={run}"], cwd=ROOT,
                        env=one_device_env(), input="".join(line + "\n" for line in lines),
                        capture_output=True, text=True, timeout=300)


def test_a_saved_multi_turn_chat_is_what_generate_answers(run, tmp_path):
  saved = tmp_path / "dialogues.jsonl"
  proc = chat(run, ["/set greedy=on max_tokens=10", "Say hello.", "Now name a colour.",
                    f"/save {saved}", "/reset", "/set temperature=-1", "/set colour=red",
                    "/show", "/quit"])
  assert proc.returncode == 0, proc.stderr
  records = [json.loads(line) for line in saved.read_text().splitlines()]
  assert len(records) == 1 and records[0]["source"] == "lima_jax.chat"
  turns = records[0]["conversations"]
  assert turns[0] == "Say hello." and turns[2] == "Now name a colour." and len(turns) == 4
  assert turns[1] in proc.stdout and turns[3] in proc.stdout  # streamed to the terminal
  assert "(saved 4 turns" in proc.stdout and "(new conversation)" in proc.stdout
  assert "/set: temperature must be positive" in proc.stdout
  assert "/set: 'colour' is not one of" in proc.stdout
  assert "greedy=True" in proc.stdout and "max_tokens=10" in proc.stdout
  # The second answer saw the first exchange: generate, given that history, says the same.
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"conversations": turns[:3]}) + "\n")
  out = tmp_path / "answers.jsonl"
  done = subprocess.run([sys.executable, "-m", "lima_jax.generate", f"--workdir={run}",
                         f"--prompts={prompts}", f"--out={out}", "--greedy", "--max_tokens=10"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert json.loads(out.read_text())["generation"] == turns[3]


def test_a_missing_run_is_a_one_line_error(tmp_path):
  proc = chat(str(tmp_path / "nothing"), [])
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: --workdir:") and "Traceback" not in proc.stderr
