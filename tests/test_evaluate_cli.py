"""`python -m lima_jax.evaluate` new / add / import-votes / report through the command line, and
its one-line errors."""

import json
import os
import shutil

import pytest

from tests.evaluate_helpers import (database, evaluate, make_study, write_generations,
                                        write_prompts)

PROMPTS = ["Write a haiku about rain.", "What is 2 + 2?", "Explain photosynthesis briefly."]
SYSTEMS = {"lima": ["Rain on the roof...", "4", "Plants turn light into sugar."],
           "gpt": ["Drops fall softly.", "Four.", "Light, water and CO2 make glucose."]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  return make_study(str(tmp_path_factory.mktemp("cli")), PROMPTS, SYSTEMS, shared=2)


@pytest.fixture
def study(made, tmp_path):
  return shutil.copytree(made, os.path.join(tmp_path, "study"))


def _votes(study):
  with database(study) as db:
    return db.execute("SELECT rater, origin, item, system, opponent, choice FROM votes "
                      "ORDER BY id").fetchall()


def _error(*args):
  """The one stderr line of a failing command (exit 2, no traceback)."""
  done = evaluate(*args, check=False)
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
  (line,) = done.stderr.strip().splitlines()
  return line


def test_new_and_add_from_generate_and_alpaca_eval(made, tmp_path):
  with database(made) as db:
    assert db.execute("SELECT COUNT(*), SUM(shared) FROM items").fetchone() == (3, 2)
    assert db.execute("SELECT system, item, sample, text FROM answers WHERE system = 'lima' "
                      "ORDER BY item").fetchall() == [
                          ("lima", i, 0, t) for i, t in enumerate(SYSTEMS["lima"])]
  # AlpacaEval's format, in another order, two samples per prompt (for helpfulness).
  path = tmp_path / "alpaca.json"
  records = [{"instruction": p, "output": f"sample {k} of {i}", "generator": "x"}
             for k in range(2) for i, p in reversed(list(enumerate(PROMPTS)))]
  path.write_text(json.dumps(records))
  study = shutil.copytree(made, tmp_path / "study")
  assert "6 answers of alpaca" in evaluate("add", f"--study={study}", "--system=alpaca",
                                           f"--answers={path}").stdout
  with database(study) as db:
    assert db.execute("SELECT item, sample, text FROM answers WHERE system = 'alpaca' AND "
                      "item = 1 ORDER BY sample").fetchall() == [(1, 0, "sample 0 of 1"),
                                                                  (1, 1, "sample 1 of 1")]


def test_add_names_a_missing_or_extra_prompt(study, tmp_path):
  short = tmp_path / "short.jsonl"
  write_generations(short, PROMPTS[:2], ["a", "b"])
  assert _error("add", f"--study={study}", "--system=x", f"--answers={short}") == (
      f"error: {short}: no answer to item 2 (line 3: 'Explain photosynthesis briefly.')")
  extra = tmp_path / "extra.jsonl"
  write_generations(extra, PROMPTS + ["Another prompt?"], ["a", "b", "c", "d"])
  assert _error("add", f"--study={study}", "--system=x", f"--answers={extra}") == (
      f"error: {extra}: record 4: answers a prompt the study does not hold "
      "(line 4: 'Another prompt?')")
  alpaca = tmp_path / "a.json"
  alpaca.write_text(json.dumps([{"instruction": "Unknown?", "output": "x"}]))
  assert _error("add", f"--study={study}", "--system=x", f"--answers={alpaca}") == (
      f"error: {alpaca}: [0]: answers a prompt the study does not hold: 'Unknown?'")
  assert _error("add", f"--study={study}", "--system=lima", f"--answers={short}") == (
      f"error: --system=lima: {study} already holds its answers")


def test_import_votes_jsonl_and_csv(study, tmp_path):
  jsonl = tmp_path / "votes.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in [
      {"item": 0, "a": "lima", "b": "gpt", "winner": "lima"},
      {"item": 1, "a": "gpt", "b": "lima", "winner": "tie"}]))
  assert "2 votes of mturk stored" in evaluate(
      "import-votes", f"--study={study}", "--rater=mturk", f"--file={jsonl}").stdout
  csv = tmp_path / "votes.csv"
  csv.write_text("item,a,b,winner\n1,lima,gpt,gpt\n2,gpt,lima,gpt\n")
  evaluate("import-votes", f"--study={study}", "--rater=prolific", f"--file={csv}")
  assert _votes(study) == [("mturk", "import", 0, "lima", "gpt", "lima"),
                           ("mturk", "import", 1, "gpt", "lima", "tie"),
                           ("prolific", "import", 1, "lima", "gpt", "gpt"),
                           ("prolific", "import", 2, "gpt", "lima", "gpt")]
  # Imported again: nothing counts twice.
  assert "0 votes of mturk stored, 2 already there" in evaluate(
      "import-votes", f"--study={study}", "--rater=mturk", f"--file={jsonl}").stdout
  evaluate("report", f"--study={study}")
  with open(os.path.join(study, "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  (people,) = report["pairwise"]  # both orientations counted as lima vs gpt
  assert (people["system"], people["opponent"], people["n"]) == ("lima", "gpt", 4)
  assert (people["win"], people["tie"], people["loss"]) == (0.25, 0.25, 0.5)
  # Both rated item 1 only (mturk: neither, prolific: gpt), which is shared: half a point.
  with database(study) as db:
    assert db.execute("SELECT shared FROM items WHERE item = 1").fetchone() == (1,)
  assert report["agreement"] == [{"raters": ["mturk", "prolific"], "n": 1,
                                  "tie_discounted_accuracy": 0.5}]
  md = open(os.path.join(study, "report.md"), encoding="utf-8").read()
  assert "| lima | gpt | people | 4 | 25% | 25% | 50% | 50% |" in md
  assert people["orders_disagree"] is None


@pytest.mark.parametrize("row, message", [
    ("5,lima,gpt,lima", "unknown item 5 (the study's items are 0-2)"),
    ("1,lima,claude,lima", "unknown system 'claude' (systems: gpt, lima)"),
    ("1,lima,gpt,bard", "winner 'bard' is neither 'lima', 'gpt' nor 'tie'"),
    ("x,lima,gpt,lima", "item 'x' is not a number"),
])
def test_import_votes_refuses_a_bad_row_naming_its_line(study, tmp_path, row, message):
  csv = tmp_path / "votes.csv"
  csv.write_text(f"item,a,b,winner\n0,lima,gpt,gpt\n{row}\n")
  assert _error("import-votes", f"--study={study}", "--rater=r", f"--file={csv}") == (
      f"error: {csv}:3: {message}")
  assert not _votes(study)  # nothing of the file is stored


def test_import_votes_jsonl_line_numbers(study, tmp_path):
  jsonl = tmp_path / "v.jsonl"
  jsonl.write_text('{"item": 0, "a": "lima", "b": "gpt", "winner": "tie"}\n\n'
                   '{"item": 0, "a": "lima", "b": "x", "winner": "tie"}\n')
  assert _error("import-votes", f"--study={study}", "--rater=r", f"--file={jsonl}") == (
      f"error: {jsonl}:3: unknown system 'x' (systems: gpt, lima)")


def test_cli_errors_are_one_line(study, tmp_path):
  missing = tmp_path / "nope"
  assert _error("report", f"--study={missing}") == (
      f"error: --study: {missing} is not a study (no study.sqlite); make one with "
      "`python -m lima_jax.evaluate new`")
  assert _error("new", f"--study={study}", f"--prompts={tmp_path}/none.jsonl").startswith(
      f"error: --prompts: cannot read {tmp_path}/none.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"conversations": ["ok"]}\n{"conversations": 3}\n')
  assert _error("new", f"--study={tmp_path}/s2", f"--prompts={bad}") == (
      f"error: {bad}:2: `conversations` must be a list of strings, got a number")
  write_prompts(tmp_path / "p.jsonl", PROMPTS)
  assert _error("new", f"--study={study}", f"--prompts={tmp_path}/p.jsonl") == (
      f"error: --study: {study} already holds a study; choose a new directory")
  assert _error("add", f"--study={study}", "--system=x", f"--answers={missing}") == (
      f"error: --answers: {missing}: no such file")
  assert _error("annotate", f"--study={study}", "--system=lima") == (
      "error: --against: pairwise needs at least one opponent")
  assert _error("annotate", f"--study={study}", "--system=lima", "--against=lima") == (
      "error: --against=lima: the system itself")
  assert _error("judge", f"--study={study}", "--system=lima", "--against=gpt").startswith(
      "error: command line: the following arguments are required: --endpoint, --model")
  assert _error("import-votes", f"--study={study}", "--rater=r", f"--file={missing}") == (
      f"error: --file: {missing}: no such file")

