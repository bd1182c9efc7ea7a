"""A system's answers to a study's prompts: read from a file, or generated now by `generate`.

Two file formats: `python -m lima_jax.generate`'s JSONL (`line`, `prompt`, `generation` per
record; a run's dev generations have it too) matched by the prompt's line in the prompts file,
and AlpacaEval's model outputs (a JSON list of `{instruction, output, generator}`) matched by the
instruction text. Every study prompt must be answered and every answer must match a prompt; a
file holding a prompt twice gives it several samples (the helpfulness ratings of section 5 use
several samples per prompt).
"""

import json
import os

from etils import epath

from lima_jax.errors import LimaError
from lima_jax.prompts import read_jsonl

PROMPTS = "prompts.jsonl"  # the study's copy of its prompts file, byte for byte


def read_file(path: str, items: list[dict]) -> list[tuple[int, str]]:
  """(item, answer text) in file order, each checked against the study's prompts."""
  if not epath.Path(path).is_file():
    raise LimaError(f"--answers: {path}: no such file")
  text = epath.Path(path).read_text()
  if text.lstrip().startswith("["):
    return _alpaca_eval(path, text, items)
  return _generations(path, items)


def _generations(path: str, items: list[dict]) -> list[tuple[int, str]]:
  by_line = {it["line"]: it for it in items}
  rows = []
  for number, record in enumerate(read_jsonl(path), start=1):
    where = f"{path}: record {number}"
    if not isinstance(record, dict) or not {"line", "prompt", "generation"} <= set(record):
      raise LimaError(f"{where}: expected `line`, `prompt` and `generation` (generate's output) "
                      "or a JSON list of AlpacaEval `instruction`/`output` records")
    item = by_line.get(record["line"])
    if item is None or item["turns"][-1] != record["prompt"]:
      raise LimaError(f"{where}: answers a prompt the study does not hold (line "
                      f"{record['line']}: {_short(record['prompt'])})")
    rows.append((item["item"], str(record["generation"])))
  return _complete(path, rows, items)


def _alpaca_eval(path: str, text: str, items: list[dict]) -> list[tuple[int, str]]:
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise LimaError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
  by_text = {}
  for it in items:
    by_text.setdefault(it["turns"][-1].strip(), it["item"])
  rows = []
  for number, record in enumerate(records):
    where = f"{path}: [{number}]"
    if not isinstance(record, dict) or not {"instruction", "output"} <= set(record):
      raise LimaError(f"{where}: expected an object with `instruction` and `output`")
    item = by_text.get(str(record["instruction"]).strip())
    if item is None:
      raise LimaError(f"{where}: answers a prompt the study does not hold: "
                      f"{_short(record['instruction'])}")
    rows.append((item, str(record["output"])))
  return _complete(path, rows, items)


def _complete(path: str, rows: list[tuple[int, str]], items: list[dict]):
  answered = {i for i, _ in rows}
  missing = [it for it in items if it["item"] not in answered]
  if missing:
    named = ", ".join(f"item {it['item']} (line {it['line']}: {_short(it['turns'][-1])})"
                      for it in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise LimaError(f"{path}: no answer to {named}{more}")
  return rows


def with_samples(files: list[list[tuple[int, str]]]) -> list[tuple[int, int, str]]:
  """(item, sample, text) rows: an item's answers numbered 0, 1, ... across files in order."""
  seen, out = {}, []
  for rows in files:
    for item, text in rows:
      out.append((item, seen.get(item, 0), text))
      seen[item] = seen.get(item, 0) + 1
  return out


def generate(study_dir: str, source, *, name: str, samples: int, seed: int,
             max_tokens: int | None) -> list[str]:
  """Answers to the study's prompts from a model, decoded as `python -m lima_jax.generate`
  decodes (the paper's nucleus 0.9, temperature 0.7, repetition penalty 1.2, from the run's
  generate.* config; LIMA section 2), `samples` times with seeds seed, seed+1, ... Each sample is
  one file in generate's format, <study>/generated/<name>_seed<S>.jsonl; returns their paths.

  `source`: the flags of `lima_jax.serve.loading.load` (workdir/epoch/step, or model with
  chat_format/eot_token, and context), which loads params as generate and the server do.
  """
  # pylint: disable=import-outside-toplevel
  from lima_jax.data import prepared_dir
  from lima_jax.decoding import Decoding, Generator
  from lima_jax.prompts import generation_records, load_prompts, write_jsonl
  from lima_jax.serve import loading
  loaded = loading.load(source)
  prompts = load_prompts(os.path.join(study_dir, PROMPTS), loaded.tokenizer,
                         data_dir=prepared_dir(study_dir), context=loaded.context,
                         what="the study's prompts")
  section = dict(loaded.generate, **({"max_tokens": max_tokens} if max_tokens else {}))
  generator = Generator(loaded.trainer, loaded.tokenizer.stop_ids, section["batch_size"])
  folder = os.path.join(study_dir, "generated")
  os.makedirs(folder, exist_ok=True)
  paths = []
  for k in range(samples):
    section["seed"] = seed + k
    ids = generator.generate(loaded.params, [p.ids for p in prompts],
                             max_new=section["max_tokens"], context=loaded.context,
                             decoding=Decoding.from_config(section))
    paths.append(os.path.join(folder, f"{name}_seed{seed + k}.jsonl"))
    write_jsonl(paths[-1], generation_records(prompts, ids, loaded.tokenizer))
  return paths


def _short(text) -> str:
  text = " ".join(str(text).split())
  return repr(text if len(text) <= 60 else text[:57] + "...")
