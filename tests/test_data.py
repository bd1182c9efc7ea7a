"""The data side through its public API: chat format, TFDS reading, epoch plan, packing."""

import hashlib
import io
import json
import logging

import numpy as np
import pytest
import sentencepiece as spm

from lima_jax import data
from lima_jax.data import lima_dataset
from lima_jax.errors import LimaError

_CORPUS = [
    "Hello there, how are you today?",
    "I am fine.\nThanks  for asking!",
    "What is the capital of France?",
    "Paris is the capital of France.",
    "Write a short poem about cats.",
    "Cats sit on mats; they purr and nap.",
    "Explain recursion in one sentence.",
    "A function that calls itself.",
]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  model = io.BytesIO()
  # Byte fallback needs 256 byte pieces, hence a vocabulary a little above them.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_CORPUS * 10), model_writer=model, vocab_size=320,
      hard_vocab_limit=False, normalization_rule_name="identity",
      remove_extra_whitespaces=False, byte_fallback=True, num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("tokenizer") / "toy.model"
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.fixture(scope="session")
def tok(tokenizer_path):
  return data.load_tokenizer(tokenizer_path)


def _write(path, lines):
  path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                          for ln in lines))
  return str(path)


def _runs(mask):
  """(start, end) of each run of ones."""
  edges = np.diff(np.concatenate([[0], (mask > 0).astype(int), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


# Chat format.

def test_tokenizer_ids_and_hash(tok, tokenizer_path):
  sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
  assert tok.eot_id == sp.get_piece_size()
  assert tok.vocab_size == tok.eot_id + 1
  assert tok.bos_id == sp.bos_id()
  with open(tokenizer_path, "rb") as f:
    assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()


def test_eot_after_every_utterance_and_mask_on_assistant(tok):
  turns = ["Hello there,\n how  are you?", "I am fine.", "What is the capital?", "Paris."]
  ids, mask = tok.encode_conversation(turns, max_length=1000, train_on_prompt=False)
  assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
  assert ids[0] == tok.bos_id and mask[0] == 0
  eots = np.flatnonzero(ids == tok.eot_id)
  assert len(eots) == len(turns) and eots[-1] == len(ids) - 1
  # Between consecutive EOTs lies exactly one utterance.
  starts = np.concatenate([[1], eots[:-1] + 1])
  assert [tok.decode(ids[s:e]) for s, e in zip(starts, eots)] == turns
  # The mask covers exactly each assistant utterance and its EOT.
  runs = _runs(mask)
  assert [tok.decode(ids[s:e]) for s, e in runs] == turns[1::2]
  assert all(ids[e - 1] == tok.eot_id for _, e in runs)
  assert [(s, e) for s, e in runs] == [(starts[i], eots[i] + 1) for i in (1, 3)]


def test_train_on_prompt_covers_all_but_bos(tok):
  ids, mask = tok.encode_conversation(["Hi.", "Hello.", "Bye."], 1000, train_on_prompt=True)
  assert mask[0] == 0 and np.all(mask[1:] == 1)
  assert (ids == tok.eot_id).sum() == 3


def test_trim_keeps_the_start(tok):
  turns = ["Write a short poem about cats.", "Cats sit on mats; they purr and nap."]
  full_ids, full_mask = tok.encode_conversation(turns, 1000, False)
  ids, mask = tok.encode_conversation(turns, 7, False)
  assert len(ids) == 7 and np.array_equal(ids, full_ids[:7])
  assert np.array_equal(mask, full_mask[:7])


def test_prompt_and_decode(tok):
  turns = ["What is the capital of France?", "Paris.", "And of Italy?"]
  prompt = tok.encode_prompt(turns)
  assert prompt[0] == tok.bos_id and prompt[-1] == tok.eot_id
  assert (prompt == tok.eot_id).sum() == 3
  # Ids past the vocabulary (EOT, padded rows) never reach the text.
  answer = tok.encode_conversation(["Paris."], 100, False)[0]
  assert tok.decode(np.concatenate([answer, [tok.eot_id, tok.vocab_size + 5]])) == "Paris."


def test_tokenizer_errors(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(LimaError, match=r"data\.tokenizer_path.*nope\.model"):
    data.load_tokenizer(missing)
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(LimaError, match=r"data\.tokenizer_path.*bad\.model") as e:
    data.load_tokenizer(str(bad))
  assert "\n" not in str(e.value)


# Reading through TFDS.

def _conversation(i):
  return {"conversations": [f"Question {i}?", f"Answer {i}.\n  Indented."], "source": f"s{i % 3}"}


def test_read_conversations_in_line_order_and_reuse(tmp_path, monkeypatch):
  builds = []
  generate = lima_dataset.LimaBuilder._generate_examples

  def counting(self):
    builds.append(self.source_sha256)
    yield from generate(self)

  monkeypatch.setattr(lima_dataset.LimaBuilder, "_generate_examples", counting)
  path = _write(tmp_path / "train.jsonl", [_conversation(i) for i in range(3)] + [""]
                + [_conversation(i) for i in range(3, 40)])
  data_dir = str(tmp_path / "tfds")
  got = data.read_conversations(path, data_dir)
  assert len(builds) == 1
  assert [c.turns for c in got] == [tuple(_conversation(i)["conversations"]) for i in range(40)]
  assert [c.source for c in got] == [f"s{i % 3}" for i in range(40)]
  assert [c.line for c in got] == [1, 2, 3] + list(range(5, 42))
  assert list((tmp_path / "tfds").rglob("*.array_record*"))

  assert data.read_conversations(path, data_dir) == got
  assert len(builds) == 1  # prepared once, then reused

  _write(tmp_path / "train.jsonl", [{"conversations": ["Edited?", "Yes."]}])
  edited = data.read_conversations(path, data_dir)
  assert len(builds) == 2
  assert [(c.turns, c.source, c.line) for c in edited] == [(("Edited?", "Yes."), "", 1)]


_GOOD = {"conversations": ["Hi?", "Hello."]}


@pytest.mark.parametrize("line, what", [
    ('{"conversations": ["a", "b"]', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"source": "x"}', "no `conversations` key"),
    ('{"conversations": "hi"}', "must be a list"),
    ('{"conversations": []}', "is empty"),
    ('{"conversations": ["a", 3]}', r"conversations\[1\] must be a string"),
    ('{"conversations": ["a", "  \\n "]}', r"conversations\[1\] is empty"),
    ('{"conversations": ["a", "b"], "source": 3}', "`source` must be a string"),
    # Valid JSON that Python decodes, but with no UTF-8 form: TFDS failed on it mid-build.
    ('{"conversations": ["a", "b \\ud83d c"]}',
     r"conversations\[1\] holds a lone surrogate \\ud83d at character 3"),
    ('{"conversations": ["a", "b"], "source": "\\udc00"}', r"`source` holds a lone surrogate"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, what):
  path = _write(tmp_path / "bad.jsonl", [_GOOD, "", line, _GOOD])
  with pytest.raises(LimaError, match=what) as e:
    data.read_conversations(path, str(tmp_path / "tfds"))
  message = str(e.value)
  assert message.startswith(f"{path}:3: ") and "\n" not in message
  assert not (tmp_path / "tfds").exists()  # rejected before TFDS wrote anything


def test_missing_and_empty_files(tmp_path, tok):
  missing = str(tmp_path / "missing.jsonl")
  with pytest.raises(LimaError, match="missing.jsonl") as e:
    data.read_conversations(missing, str(tmp_path / "tfds"))
  assert "\n" not in str(e.value)
  with pytest.raises(LimaError, match=r"^data\.eval_path: .*missing\.jsonl"):
    data.load_examples(missing, tok, max_length=64, train_on_prompt=False,
                       data_dir=str(tmp_path / "tfds"), what="data.eval_path")
  for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n")]:
    (tmp_path / name).write_text(text)
    with pytest.raises(LimaError, match=f"{name}: no records"):
      data.read_conversations(str(tmp_path / name), str(tmp_path / "tfds"))


# Examples.

def test_odd_and_single_turn_records(tmp_path, tok, caplog):
  path = _write(tmp_path / "train.jsonl", [
      {"conversations": ["Hi?", "Hello."]},
      {"conversations": ["Hi?", "Hello.", "Dangling?"]},
      {"conversations": ["Alone?"]},
  ])
  with caplog.at_level(logging.WARNING):
    examples = data.load_examples(path, tok, max_length=64, train_on_prompt=False,
                                  data_dir=str(tmp_path / "tfds"))
  assert len(examples) == 2
  expected, _ = tok.encode_conversation(["Hi?", "Hello."], 64, False)
  assert all(np.array_equal(e.ids, expected) for e in examples)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  odd = [w for w in warnings if "odd number of turns" in w]
  alone = [w for w in warnings if "no assistant turn" in w]
  assert odd == [f"{path}: 1 record with an odd number of turns lost its trailing user turn"]
  assert alone == [f"{path}: 1 record with no assistant turn was skipped"]
  assert len(warnings) == 2


def test_trimmed_records_are_counted(tmp_path, tok, caplog):
  long = {"conversations": ["Hi?", "Cats sit on mats; they purr and nap. " * 5]}
  path = _write(tmp_path / "train.jsonl", [long, long, _GOOD])
  with caplog.at_level(logging.WARNING):
    examples = data.load_examples(path, tok, max_length=16, train_on_prompt=False,
                                  data_dir=str(tmp_path / "tfds"))
  assert [len(e.ids) for e in examples][:2] == [16, 16]
  assert any("2 records were trimmed to max_length=16" in r.getMessage()
             for r in caplog.records)


def test_records_trimmed_to_no_assistant_token_are_skipped(tmp_path, tok, caplog):
  long_prompt = {"conversations": ["Explain recursion in one sentence. " * 5, "No."]}
  path = _write(tmp_path / "train.jsonl", [long_prompt, _GOOD])
  with caplog.at_level(logging.WARNING):
    examples = data.load_examples(path, tok, max_length=8, train_on_prompt=False,
                                  data_dir=str(tmp_path / "tfds"))
  assert len(examples) == 1
  assert any("1 record was skipped: no trained token left" in r.getMessage()
             for r in caplog.records)


def test_every_record_trimmed_away_blames_max_length(tmp_path, tok):
  long_prompt = {"conversations": ["Explain recursion in one sentence. " * 5, "No."]}
  path = _write(tmp_path / "dev.jsonl", [long_prompt, long_prompt, {"conversations": ["Alone?"]}])
  with pytest.raises(LimaError, match=r"^data\.max_length: 8 tokens leave no trained token in "
                     r"any record of data\.dev_path .*dev\.jsonl \(2 trimmed away, 1 without an "
                     r"assistant turn\)"):
    data.load_examples(path, tok, max_length=8, train_on_prompt=False,
                       data_dir=str(tmp_path / "tfds"), what="data.dev_path")


def test_no_usable_example(tmp_path, tok):
  path = _write(tmp_path / "train.jsonl", [{"conversations": ["Alone?"]}])
  with pytest.raises(LimaError, match=r"data\.train_path: .*train\.jsonl.*no usable") as e:
    data.load_examples(path, tok, max_length=64, train_on_prompt=False,
                       data_dir=str(tmp_path / "tfds"))
  assert "\n" not in str(e.value)


# Epoch plan.

def test_epoch_plan_visits_every_example_once():
  plan = data.EpochPlan(1000, 32, seed=0)
  assert plan.steps_per_epoch == 32
  orders = []
  for epoch in range(3):
    steps = range(epoch * 32, (epoch + 1) * 32)
    assert {plan.epoch_of(s) for s in steps} == {epoch}
    ids = [plan.example_ids(s) for s in steps]
    assert [len(i) for i in ids] == [32] * 31 + [8]
    order = np.concatenate(ids)
    assert np.array_equal(np.sort(order), np.arange(1000))
    orders.append(order)
  assert not np.array_equal(orders[0], orders[1])
  assert not np.array_equal(orders[1], orders[2])


def test_epoch_plan_is_a_function_of_seed_and_step():
  a, b = data.EpochPlan(100, 8, seed=3), data.EpochPlan(100, 8, seed=3)
  b.example_ids(0)  # a different history must not matter
  assert np.array_equal(a.example_ids(57), b.example_ids(57))
  assert np.array_equal(a.example_ids(3), b.example_ids(3))
  other = data.EpochPlan(100, 8, seed=4)
  assert not np.array_equal(a.example_ids(57), other.example_ids(57))


# Packing.

def _examples(token_counts, seed=0):
  rng = np.random.default_rng(seed)
  return [data.Example(ids=rng.integers(1, 300, n).astype(np.int32),
                       loss_mask=(rng.random(n) < 0.6).astype(np.float32))
          for n in token_counts]


def test_pack_step_layout():
  rng = np.random.default_rng(1)
  examples = _examples(rng.integers(2, 40, 32))
  length = 64
  rows = data.rows_needed([[len(e.ids) for e in examples]], length) + 1  # one padding row
  batch = data.pack_step(examples, rows, length)
  assert set(batch) == {"tokens", "targets", "weights", "segment_ids", "positions"}
  for name, dtype in [("tokens", np.int32), ("targets", np.int32), ("weights", np.float32),
                      ("segment_ids", np.int32), ("positions", np.int32)]:
    assert batch[name].shape == (rows, length) and batch[name].dtype == dtype
  found = []
  for r in range(rows):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      where = np.flatnonzero(seg == s)
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
      assert np.array_equal(batch["positions"][r, where], np.arange(len(where)))
      found.append((batch["tokens"][r, where], batch["targets"][r, where],
                    batch["weights"][r, where]))
  assert len(found) == len(examples)  # one segment each: none overlap or go missing
  for e in examples:
    matches = [f for f in found if len(f[0]) == len(e.ids) - 1
               and np.array_equal(f[0], e.ids[:-1])]
    assert len(matches) == 1
    tokens, targets, weights = matches[0]
    assert np.array_equal(targets, e.ids[1:]) and np.array_equal(weights, e.loss_mask[1:])
  assert batch["weights"].sum() == sum(e.loss_mask[1:].sum() for e in examples)
  pad = batch["segment_ids"] == 0
  for name in batch:
    assert not batch[name][pad].any()
  assert not batch["segment_ids"][-1].any()  # the spare row is all padding
  again = data.pack_step(examples, rows, length)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)


def test_ffd_row_count_and_too_few_rows():
  # Positions 7,5,4,3,2,1 in rows of 10, first-fit decreasing: [7,3] [5,4,1] [2].
  counts = [8, 6, 5, 4, 3, 2]
  assert data.rows_needed([counts], 10) == 3
  assert data.rows_needed([[11, 11], counts, [3]], 10) == 3
  assert data.rows_needed([[11, 11, 11]], 10) == 3
  batch = data.pack_step(_examples(counts), 3, 10)
  assert np.array_equal(batch["segment_ids"], [[1] * 7 + [2] * 3,
                                                [1] * 5 + [2] * 4 + [3],
                                                [1] * 2 + [0] * 8])
  with pytest.raises(LimaError, match=r"data\.rows_per_step") as e:
    data.pack_step(_examples(counts), 2, 10)
  assert "\n" not in str(e.value)
  with pytest.raises(LimaError, match=r"data\.max_length"):
    data.pack_step(_examples([12]), 4, 10)
