"""Bad input to `python -m lima_jax.train`: one line naming the culprit, exit 2, no traceback,
and an existing workdir's checkpoints left exactly as they were."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, tree_hashes
from lima_jax import config, config_cli, train
TINY = ["--config.train.epochs=1", "--config.train.batch_size=32", "--config.data.max_length=64",
        "--config.model.n_layers=1", "--config.optimizer.warmup_steps=0"]  # 3 steps


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding a finished run's checkpoints, trained with the TINY flags."""
  path = str(tmp_path_factory.mktemp("existing"))
  proc = subprocess.run([sys.executable, "-m", "lima_jax.train", *TINY, f"--workdir={path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return path


def jsonl(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


GOOD = json.dumps({"conversations": ["Hi?", "Hello."], "source": "t"})
# json.dumps writes a lone surrogate as the escape \ud83d: valid JSON, but with no UTF-8 form.
LONG_PROMPT = json.dumps({"conversations": ["Tell me more. " * 40, "No."]})
SURROGATE_TURN = json.dumps({"conversations": ["Hi \ud83d", "Hello."]})
SURROGATE_SOURCE = json.dumps({"conversations": ["Hi?", "Hello."], "source": "\udc00"})
CASES = {
    "missing data file": (lambda t: ["--config.data.train_path=/no/such/train.jsonl"],
                          "/no/such/train.jsonl"),
    "data path is a directory": (lambda t: [f"--config.data.train_path={t}"], str("data.train_path")),
    "invalid JSON": (lambda t: [f"--config.data.train_path={jsonl(t, 'a.jsonl', [GOOD, GOOD, '{oops'])}"],
                     "a.jsonl:3"),
    "record without conversations": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'b.jsonl', [GOOD, json.dumps({'source': 'x'})])}"],
        "b.jsonl:2"),
    "non-string turn": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'c.jsonl', [json.dumps({'conversations': ['q', 7]})])}"],
        "c.jsonl:1"),
    "empty turn": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'd.jsonl', [GOOD, json.dumps({'conversations': ['q', '  ']})])}"],
        "d.jsonl:2"),
    "no usable example": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'e.jsonl', [json.dumps({'conversations': ['only a prompt']})])}"],
        "e.jsonl"),
    "unknown config key": (lambda t: ["--config.train.bogus=1"], "--config.train.bogus"),
    "value of the wrong type": (lambda t: ["--config.train.epochs=many"], "--config.train.epochs"),
    "mesh does not divide the devices": (lambda t: ["--config.mesh.data=3"], "8 devices"),
    "non-positive batch size": (lambda t: ["--config.train.batch_size=0"], "train.batch_size"),
    "non-positive epochs": (lambda t: ["--config.train.epochs=-1"], "train.epochs"),
    "missing tokenizer": (lambda t: ["--config.data.tokenizer_path=/no/tok.model"], "/no/tok.model"),
    "missing config file": (lambda t: ["--config=/no/config.py"], "/no/config.py"),
    "another model in the workdir": (lambda t: ["--config.model.d_model=256"], "model.d_model"),
    "negative seed": (lambda t: ["--config.seed=-1"], "seed"),
    "max_length below 2": (lambda t: ["--config.data.max_length=1"], "data.max_length"),
    "zero learning rate": (lambda t: ["--config.optimizer.learning_rate=0"], "optimizer.learning_rate"),
    "b1 out of range": (lambda t: ["--config.optimizer.b1=1.5"], "optimizer.b1"),
    "heads do not divide d_model": (lambda t: ["--config.model.n_heads=3"], "model.n_heads"),
    "unknown remat policy": (lambda t: ["--config.model.remat=sometimes"], "model.remat"),
    "unsupported dtype": (lambda t: ["--config.model.compute_dtype=float16"], "model.compute_dtype"),
    "unknown attention kernel": (lambda t: ["--config.model.attention=flash"], "model.attention"),
    "attention kernel this platform cannot run": (lambda t: ["--config.model.attention=splash"],
                                                  "model.attention"),
    "micro-batch rows that do not split over the batch shards": (
        lambda t: ["--config.train.micro_batch_rows=3"], "train.micro_batch_rows"),
    "micro-batch rows below -1": (lambda t: ["--config.train.micro_batch_rows=-2"],
                                  "train.micro_batch_rows"),
    "negative checkpoint cadence": (lambda t: ["--config.checkpoint.every_steps=-1"],
                                    "checkpoint.every_steps"),
    "missing dev file": (lambda t: ["--config.data.dev_path=/no/dev.jsonl"], "/no/dev.jsonl"),
    "missing init_from": (lambda t: ["--config.init_from=/no/weights"], "/no/weights"),
    "tokenizer that is not sentencepiece": (
        lambda t: [f"--config.data.tokenizer_path={jsonl(t, 'tok.model', ['not a model'])}"],
        "tok.model"),
    "a line that is not an object": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'f.jsonl', [GOOD, '[1, 2]'])}"], "f.jsonl:2"),
    "conversations not a list": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'g.jsonl', [json.dumps({'conversations': 'hi'})])}"],
        "g.jsonl:1"),
    "source not a string": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'h.jsonl', [json.dumps({'conversations': ['q', 'a'], 'source': 3})])}"],
        "h.jsonl:1"),
    "unexpected positional argument": (lambda t: ["train.jsonl"], "train.jsonl"),
    # Well-formed records whose prompts alone fill max_length (64 in TINY): the limit is the
    # culprit, not the format (the message blamed the format before).
    "every dev record trimmed away": (
        lambda t: [f"--config.data.dev_path={jsonl(t, 'l.jsonl', [LONG_PROMPT, LONG_PROMPT])}"],
        "data.max_length: 64 tokens leave no trained token in any record of data.dev_path"),
    "lone surrogate in a turn": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'i.jsonl', [GOOD, SURROGATE_TURN])}"],
        "i.jsonl:2: conversations[0] holds a lone surrogate"),
    "lone surrogate in the source": (
        lambda t: [f"--config.data.train_path={jsonl(t, 'j.jsonl', [SURROGATE_SOURCE])}"],
        "j.jsonl:1: `source` holds a lone surrogate"),
    "lone surrogate in a dev turn": (
        lambda t: [f"--config.data.dev_path={jsonl(t, 'k.jsonl', [GOOD, SURROGATE_TURN])}"],
        "k.jsonl:2: conversations[0] holds a lone surrogate"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_touches_nothing(case, workdir, tmp_path):
  make_args, culprit = CASES[case]
  before = tree_hashes(os.path.join(workdir, "checkpoints"))
  args = make_args(tmp_path)
  config_file = [a for a in args if a.startswith("--config=")]  # absl wants it before overrides
  args = config_file + TINY + [a for a in args if a not in config_file]
  proc = subprocess.run(
      [sys.executable, "-m", "lima_jax.train", *args, f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  assert errors == [lines[-1]], proc.stderr
  assert culprit in errors[0]
  assert tree_hashes(os.path.join(workdir, "checkpoints")) == before


def test_fail_prints_one_line_and_exits_2():
  with pytest.raises(SystemExit) as exit_info:
    train.fail("config train.epochs: must be positive")
  assert exit_info.value.code == 2


def _ml_collections_hint(config_file, section, typo):
  """What the installed ml_collections itself says about a mistyped key: its lines after the
  first (in 1.1, 'Did you mean "batch_size" instead of "batchsize"?')."""
  cfg = config.from_file(config_file)
  cfg.lock()
  with pytest.raises(KeyError) as e:
    cfg[section][typo] if section else cfg[typo]  # pylint: disable=expression-not-assigned
  return [line.strip() for line in e.value.args[0].splitlines()[1:] if line.strip()]


@pytest.mark.parametrize("module, args, key", [
    ("train", [], "train.batchsize"),  # overrides of the default file fail while flags are defined
    ("train", ["--config=configs/toy.py"], "train.batchsize"),  # ... or while they are parsed
    ("train", ["--config=configs/lima_7b.py"], "trian.batch_size"),
    ("plan", ["--topology=cpu:8"], "train.batchsize"),  # the same parsing as train
])
def test_unknown_key_is_named_with_ml_collections_hint(module, args, key, tmp_path):
  """ml_collections 1.1 nests its KeyError in an AttributeError, which the message parsing of
  the past turned into `error: \\: no such config key`."""
  config_file = os.path.join(ROOT, args[0].split("=", 1)[1] if args[0:1] and
                             args[0].startswith("--config=") else "configs/toy.py")
  section, _, typo = key.rpartition(".")
  hint = _ml_collections_hint(config_file, section, typo)
  assert hint  # the installed ml_collections suggests a key for these typos
  proc = subprocess.run([sys.executable, "-m", f"lima_jax.{module}", *args, f"--config.{key}=8",
                         f"--workdir={tmp_path / 'run'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith(f"error: --config.{key}: no such config key"), lines
  assert all(h in lines[-1] for h in hint), (hint, lines[-1])
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module, args, override, expected", [
    ("train", [], "train.epochs=abc", "an int"),  # the default file: the path config_cli names
    ("train", ["--config=configs/lima_7b.py"], "optimizer.learning_rate=fast", "a float"),
    ("plan", ["--topology=cpu:8"], "data.train_on_prompt=maybe", "a bool, true or false"),
])
def test_value_of_the_wrong_type_names_key_value_and_type(module, args, override, expected,
                                                          tmp_path):
  """Before, absl's own words came out: `error: command line: flag --config.train.epochs=abc:
  invalid literal for int() with base 10: 'abc'`, which this exact line does not match."""
  config_file = args[0].split("=", 1)[1] if args[0:1] and args[0].startswith("--config=") else (
      config_cli.DEFAULT_CONFIG)
  proc = subprocess.run([sys.executable, "-m", f"lima_jax.{module}", *args, f"--config.{override}",
                         f"--workdir={tmp_path / 'run'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  key = override.split("=", 1)[0]
  assert [line for line in proc.stderr.splitlines() if line.strip()] == [
      f"error: --config.{override}: expected {expected} (the type of {key} in {config_file})"]
  assert not (tmp_path / "run").exists()


def _flat(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


@pytest.mark.parametrize("module", ["train", "plan"])
def test_show_config_lists_every_key_after_overrides(module, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", f"lima_jax.{module}", "--config=configs/lima_7b.py",
                         "--config.train.batch_size=8", "--config.data.train_path=x.jsonl",
                         "--show_config", f"--workdir={workdir}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  shown = dict(line.split(" = ", 1) for line in proc.stdout.splitlines()
               if line and not line.startswith("#"))
  want = dict(_flat(config.from_file(os.path.join(ROOT, "configs", "lima_7b.py")).to_dict()))
  assert set(shown) == set(want)
  assert shown["train.batch_size"] == "8" and shown["data.train_path"] == "'x.jsonl'"
  assert shown["model.d_model"] == repr(want["model.d_model"])
  assert not workdir.exists()
