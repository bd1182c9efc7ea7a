"""The sample set shipped with the package, its committed tokenizer and the script that made it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import sentencepiece as spm

import lima_jax

_SAMPLES = pathlib.Path(lima_jax.__file__).parent / "sample_data"
_ROOT = pathlib.Path(lima_jax.__file__).parent.parent


def _records(name):
  lines = (_SAMPLES / name).read_text(encoding="utf-8").splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def _run_script(*args):
  # The package may not be installed; run it from the checkout the tests import.
  paths = [str(_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
  return subprocess.run([sys.executable, "-m", "lima_jax.data.train_tokenizer", *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("name, minimum", [("train.jsonl", 60), ("dev.jsonl", 10)])
def test_records_are_valid(name, minimum):
  records = _records(name)
  assert len(records) >= minimum
  for r in records:
    turns = r["conversations"]
    assert isinstance(turns, list) and turns
    assert all(isinstance(t, str) and t.strip() for t in turns)
    assert isinstance(r["source"], str) and r["source"]


def test_train_covers_diverse_tasks_and_shapes():
  records = _records("train.jsonl")
  assert len({r["source"] for r in records}) >= 6
  lengths = [len(r["conversations"]) for r in records]
  # The trainer drops a trailing user turn and reports it; exactly one record exercises that.
  assert sum(n % 2 for n in lengths) == 1
  assert sum(n >= 4 for n in lengths) >= 4
  assert sum(r["source"] == "safety" for r in records) >= 5


def test_dev_is_prompt_and_reference_and_unseen_in_train():
  dev = _records("dev.jsonl")
  assert all(len(r["conversations"]) == 2 for r in dev)
  train_prompts = {t for r in _records("train.jsonl") for t in r["conversations"][::2]}
  assert not [r["conversations"][0] for r in dev if r["conversations"][0] in train_prompts]
  assert len({r["conversations"][0] for r in dev}) == len(dev)


def test_committed_tokenizer_layout_and_exact_round_trip():
  sp = spm.SentencePieceProcessor(model_file=str(_SAMPLES / "tokenizer.model"))
  # EOT takes id piece_count; with <= 1023 pieces the padded model vocab stays at 1024.
  assert 256 < sp.get_piece_size() <= 1023
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
  turns = [t for name in ("train.jsonl", "dev.jsonl") for r in _records(name)
           for t in r["conversations"]]
  assert any("\n\n" in t for t in turns) and any("    " in t for t in turns)
  bad = [t[:60] for t in turns if sp.decode(sp.encode(t)) != t]
  assert not bad


def test_script_trains_a_small_tokenizer(tmp_path):
  turns = ["Hi!  Can you show me a loop?",
           "Sure:\n\n```python\nfor i in range(3):\n    print(i)\n```\nTip: 2024 ends soon.",
           "Thanks.\n", "  You're welcome, café owner."]
  data = tmp_path / "small.jsonl"
  data.write_text("".join(json.dumps({"conversations": turns, "source": "t"}) + "\n"
                          for _ in range(20)), encoding="utf-8")
  out = tmp_path / "sub" / "tok.model"
  # byte_fallback reserves 256 byte pieces, so the smallest useful vocab is a bit above that.
  result = _run_script("--out", out, "--vocab_size", 300, data)
  assert result.returncode == 0, result.stderr
  assert "round trip: exact" in result.stdout
  sp = spm.SentencePieceProcessor(model_file=str(out))
  assert sp.get_piece_size() == 300
  assert all(sp.decode(sp.encode(t)) == t for t in turns)


def test_script_reports_bad_json_line_without_traceback(tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"conversations": ["a", "b"]}\n{"conversations": ["a",\n', encoding="utf-8")
  result = _run_script("--out", tmp_path / "tok.model", "--vocab_size", 300, data)
  assert result.returncode == 2
  assert f"{data}:2" in result.stderr
  assert "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "tok.model").exists()


def test_script_reports_missing_file(tmp_path):
  missing = tmp_path / "nope.jsonl"
  result = _run_script("--out", tmp_path / "tok.model", missing)
  assert result.returncode == 2
  assert str(missing) in result.stderr and "Traceback" not in result.stderr
