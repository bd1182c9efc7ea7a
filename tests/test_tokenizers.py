"""Tokenizer backends, EOT planning, chat formats and exports that transformers reads back.

Sources are built here: the sample sentencepiece model, a byte-level BPE tokenizer.json trained
with `tokenizers` (SmolLM2-like: ChatML specials, no BOS), a sentencepiece-derived
tokenizer.json saved by transformers (TinyLlama-like), and LLaMA-3-style tiktoken ranks trained
with tiktoken.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from lima_jax import config, config_cli, data  # pylint: disable=wrong-import-position
from lima_jax.data import tokenizer as backends  # pylint: disable=wrong-import-position
from lima_jax.errors import LimaError  # pylint: disable=wrong-import-position
from lima_jax.weights import hf_tokenizer  # pylint: disable=wrong-import-position

SP_MODEL = config.sample_data("tokenizer.model")
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
          "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
          "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_CHAT = ("{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def conversations():
  """Every sample conversation with an even number of turns (as training keeps them)."""
  with open(config.sample_data("train.jsonl"), encoding="utf-8") as f:
    turns = [json.loads(line)["conversations"] for line in f]
  return [t[:len(t) - len(t) % 2] for t in turns]


def _texts():
  return [turn for c in conversations() for turn in c]


def _write_json(path, obj):
  path.write_text(json.dumps(obj))


def build_bpe_dir(path):
  """A byte-level BPE tokenizer.json (as SmolLM2's) with a ChatML template and no BOS."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_texts(), trainer)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  _write_json(path / "tokenizer_config.json",
              {"eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHATML})
  return path


def build_tiktoken_file(path):
  """LLaMA-3-style tiktoken ranks ("<base64 token> <rank>" lines), trained by tiktoken."""
  import base64  # pylint: disable=import-outside-toplevel
  from tiktoken import _educational  # pylint: disable=import-outside-toplevel
  ranks = _educational.bpe_train("".join(_texts())[:20000], 300, backends.LLAMA3_PATTERN,
                                 visualise=None)
  path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r
                            for t, r in sorted(ranks.items(), key=lambda x: x[1])))
  return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  sp_template = root / "sp_template"
  sp_template.mkdir()
  shutil.copyfile(SP_MODEL, sp_template / "tokenizer.model")
  _write_json(sp_template / "tokenizer_config.json",
              {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_CHAT})
  # transformers converts the sentencepiece model into a Metaspace tokenizer.json (TinyLlama's
  # kind: prefix "first"), saved with an added <pad> as HF LLaMA-2 checkpoints often carry.
  metaspace = root / "metaspace"
  shutil.copytree(sp_template, metaspace)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(metaspace))
  hf_tok.add_special_tokens({"pad_token": "<pad>"})
  hf_tok.save_pretrained(str(metaspace))
  (metaspace / "tokenizer.model").unlink()
  # Mistral v0.3's form (transformers' legacy=false): no normalizer, a Metaspace pre-tokenizer
  # that prefixes only the start of the text.
  first = root / "metaspace_first"
  shutil.copytree(metaspace, first)
  spec = json.loads((first / "tokenizer.json").read_text())
  spec["normalizer"] = None
  spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                           "prepend_scheme": "first", "split": False}
  _write_json(first / "tokenizer.json", spec)
  sp_eos = root / "sp_eos"  # a LLaMA-style config that adds EOS too
  sp_eos.mkdir()
  shutil.copyfile(SP_MODEL, sp_eos / "tokenizer.model")
  _write_json(sp_eos / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>",
                                                 "add_bos_token": True, "add_eos_token": True})
  return {"sentencepiece": SP_MODEL, "sp_template": str(sp_template), "sp_eos": str(sp_eos),
          "bpe": str(build_bpe_dir(root / "bpe")), "metaspace": str(metaspace),
          "metaspace_first": str(first),
          "tiktoken": str(build_tiktoken_file(root / "llama3.tiktoken"))}


# Backends and EOT.

def test_sentencepiece_ids_are_unchanged(sources):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor(model_file=SP_MODEL)
  tok = data.load_tokenizer(sources["sentencepiece"])
  assert (tok.kind, tok.token_count, tok.eot_id, tok.vocab_size, tok.adds_eot) == (
      "sentencepiece", 1000, 1000, 1001, True)
  with open(SP_MODEL, "rb") as f:  # a lone .model hashes as it always did: resumes still work
    assert tok.sha256 == hashlib.sha256(f.read()).hexdigest()
  turns = conversations()[0]
  ids, _ = tok.encode_conversation(turns, 10_000, False)
  assert ids.tolist() == [sp.bos_id()] + [i for t in turns for i in sp.encode(t) + [1000]]


def test_tokenizer_json_without_bos_and_eot_by_name(sources):
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  ref = Tokenizer.from_file(os.path.join(sources["bpe"], "tokenizer.json"))
  count = ref.get_vocab_size(with_added_tokens=True)
  tok = data.load_tokenizer(sources["bpe"])
  assert tok.kind == "tokenizer.json" and tok.bos_id is None  # nothing is prepended
  assert (tok.eot_id, tok.vocab_size, tok.adds_eot) == (count, count + 1, True)
  turns = conversations()[1]
  ids, mask = tok.encode_conversation(turns, 10_000, False)
  expected = [i for t in turns for i in ref.encode(t, add_special_tokens=False).ids + [count]]
  assert ids.tolist() == expected
  assert mask.sum() == len(ref.encode(turns[1], add_special_tokens=False).ids) + 1
  named = data.load_tokenizer(sources["bpe"], eot_token="<|im_end|>")
  assert (named.eot_id, named.vocab_size, named.adds_eot) == (2, count, False)
  # Weights with more rows than the tokenizer (padding): a new EOT goes after all of them.
  padded = data.load_tokenizer(sources["bpe"], source_rows=count + 3)
  assert (padded.eot_id, padded.vocab_size) == (count + 3, count + 4)


def test_tiktoken_has_llama3_specials(sources):
  tok = data.load_tokenizer(sources["tiktoken"], eot_token="<|eot_id|>")
  assert tok.kind == "tiktoken" and tok.token_count == 300 + 256
  assert (tok.bos_id, tok.eot_id, tok.vocab_size) == (300, 309, 556)  # as in LLaMA-3: +0, +9
  assert tok.backend.token_id("<|start_header_id|>") == 306
  turns = conversations()[2]
  ids, _ = tok.encode_conversation(turns, 10_000, False)
  assert tok.decode(ids) == "".join(turns)
  assert data.load_tokenizer(sources["tiktoken"]).eot_id == 556  # LIMA's rule: a new row
  assert tok.stop_ids == (309, 301, 308)  # and Meta's: <|end_of_text|>, <|eom_id|> (3.1)
  assert tok.decode([1, 2, 301]) == tok.decode([1, 2])  # an end id is no text


def _with_config(source, path, **keys):
  """A copy of a tokenizer directory with keys set in its tokenizer_config.json."""
  shutil.copytree(source, path)
  config_path = path / "tokenizer_config.json"
  cfg = json.loads(config_path.read_text()) if config_path.exists() else {}
  _write_json(config_path, dict(cfg, **keys))
  return str(path)


def test_bos_and_eos_are_what_transformers_adds_to_a_text(sources, tmp_path):
  """In the lima format a conversation gets the tokens transformers puts around a text it
  encodes: tokenizer_config.json's add_bos_token / add_eos_token when present, else the
  tokenizer.json's post-processor (a named bos_token alone adds nothing: SmolLM2's case, where
  <|im_start|> was prepended before). A prompt gets no EOS. A training run's checkpoint from
  before this rule keeps its BOS (trained_with without a record)."""
  from tokenizers import Tokenizer, processors  # pylint: disable=import-outside-toplevel
  llama3_like = tmp_path / "llama3_like"  # BOS from the post-processor only, as LLaMA-3's
  shutil.copytree(sources["bpe"], llama3_like)
  spec = Tokenizer.from_file(str(llama3_like / "tokenizer.json"))
  spec.post_processor = processors.TemplateProcessing(
      single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
  spec.save(str(llama3_like / "tokenizer.json"))
  cases = {
      "sp-eos": _with_config(os.path.dirname(SP_MODEL), tmp_path / "sp_eos", add_eos_token=True,
                             bos_token="<s>", eos_token="</s>"),
      "sp-no-bos": _with_config(sources["sp_template"], tmp_path / "sp_nobos",
                                add_bos_token=False),
      "bpe-named-bos": _with_config(sources["bpe"], tmp_path / "bpe_named",
                                    bos_token="<|im_start|>"),
      "metaspace": sources["metaspace"],
      "llama3-like": str(llama3_like),
  }
  turns = conversations()[3][:2]
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor(model_file=SP_MODEL)
  references = {name: transformers.AutoTokenizer.from_pretrained(path)
                for name, path in cases.items()}
  # A lone tokenizer.model has no config: BOS, as Meta's LLaMA code and llama.cpp add it.
  cases["sentencepiece"] = SP_MODEL
  references["sentencepiece"] = lambda text, add_special_tokens=True: {
      "input_ids": sp.encode(text, add_bos=add_special_tokens)}
  for name, path in cases.items():
    tok = data.load_tokenizer(path)
    with_specials = references[name](turns[0])["input_ids"]
    plain = references[name](turns[0], add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(with_specials)) if with_specials[i:i + len(plain)] == plain)
    before, after = with_specials[:start], with_specials[start + len(plain):]
    ids, mask = tok.encode_conversation(turns, 1 << 20, False)
    body = [i for t in turns for i in tok.backend.encode(t) + [tok.eot_id]]
    assert ids.tolist() == before + body + after, name
    assert mask[:len(before)].sum() == 0 and mask[len(ids) - len(after):].sum() == 0, name
    assert tok.encode_prompt(turns[:1]).tolist() == before + body[:len(tok.backend.encode(
        turns[0])) + 1], name
  assert data.load_tokenizer(cases["bpe-named-bos"]).bos_id is None
  # transformers 5 ignores add_bos_token for a byte-level tokenizer.json; llama.cpp honours it
  # (its converter writes it as tokenizer.ggml.add_bos_token), and so do we.
  flagged = data.load_tokenizer(_with_config(sources["bpe"], tmp_path / "bpe_add",
                                             bos_token="<|im_start|>", add_bos_token=True))
  assert flagged.encode_conversation(turns, 1 << 20, False)[0][0] == 1
  legacy = data.load_tokenizer(cases["bpe-named-bos"], trained_with={"eot_id": 600})
  assert (legacy.bos_id, legacy.eos_append_id) == (1, None)
  assert (data.load_tokenizer(cases["sp-eos"]).meta()["bos_id"],
          data.load_tokenizer(cases["sp-eos"]).meta()["eos_append_id"]) == (None, 2)
  recorded = data.load_tokenizer(cases["sp-eos"], trained_with={"bos_id": 1,
                                                                "eos_append_id": None})
  assert (recorded.bos_id, recorded.eos_append_id) == (1, None)


def test_directory_prefers_tokenizer_json_and_hash_covers_every_file(sources, tmp_path):
  both = tmp_path / "both"
  shutil.copytree(sources["bpe"], both)
  shutil.copyfile(SP_MODEL, both / "tokenizer.model")
  tok = data.load_tokenizer(str(both))
  assert tok.kind == "tokenizer.json" and tok.sha256 == data.load_tokenizer(sources["bpe"]).sha256
  config_path = both / "tokenizer_config.json"
  config_path.write_text(config_path.read_text().replace("helpful", "kind"))
  assert data.load_tokenizer(str(both)).sha256 != tok.sha256  # the template is part of it


def test_bad_tokenizers_get_one_line_errors(sources, tmp_path):
  bad = tmp_path / "notes.txt"
  bad.write_text("just some text\n")
  for path, match in ((str(bad), r"notes\.txt is not a tokenizer"),
                      (str(tmp_path), r"holds no tokenizer\.json or tokenizer\.model")):
    with pytest.raises(LimaError, match=match) as e:
      data.load_tokenizer(path)
    assert "\n" not in str(e.value)
  with pytest.raises(LimaError, match=r"data\.eot_token: '<\|eot_id\|>' is not a token"):
    data.load_tokenizer(sources["bpe"], eot_token="<|eot_id|>")
  with pytest.raises(LimaError, match=r"data\.eot_token: data\.chat_format=template needs"):
    data.load_tokenizer(sources["bpe"], chat_format="template")
  with pytest.raises(LimaError, match="has no chat template"):
    data.load_tokenizer(sources["tiktoken"], eot_token="<|eot_id|>", chat_format="template")
  wrong = data.load_tokenizer(sources["bpe"], eot_token="<|endoftext|>", chat_format="template")
  with pytest.raises(LimaError, match=r"does not end assistant messages with '<\|endoftext\|>'"):
    wrong.encode_conversation(conversations()[0], 10_000, False)


# The template format.

def test_template_mask_matches_transformers_assistant_mask(sources):
  """transformers marks the assistant tokens of the template's {% generation %} blocks: ours,
  found from growing prefixes of the conversation, agree."""
  hf_tok = transformers.AutoTokenizer.from_pretrained(sources["bpe"])
  tok = data.load_tokenizer(sources["bpe"], eot_token="<|im_end|>", chat_format="template")
  for turns in conversations():
    messages = [{"role": "assistant" if i % 2 else "user", "content": t}
                for i, t in enumerate(turns)]
    ref = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    ids, mask = tok.encode_conversation(turns, 10_000, False)
    assert ids.tolist() == ref["input_ids"]
    assert mask.tolist() == ref["assistant_masks"]
  _, everything = tok.encode_conversation(conversations()[0], 10_000, True)
  assert everything[0] == 0 and everything[1:].all()


# Exports.

CASES = {  # source, eot_token, chat_format
    "sentencepiece-lima": ("sentencepiece", "", "lima"),
    "sentencepiece-template": ("sp_template", "</s>", "template"),
    "sentencepiece-eos-lima": ("sp_eos", "", "lima"),
    "bpe-lima": ("bpe", "", "lima"),
    "bpe-lima-im_end": ("bpe", "<|im_end|>", "lima"),
    "bpe-template": ("bpe", "<|im_end|>", "template"),
    "metaspace-lima-pad": ("metaspace", "", "lima"),
    "metaspace-first-lima": ("metaspace_first", "", "lima"),
    "tiktoken-lima": ("tiktoken", "", "lima"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_tokenizer_reproduces_training_ids(sources, tmp_path, case):
  """transformers' apply_chat_template on the export gives training's ids for every sample
  conversation (multi-turn ones included) and every prompt. Writing sentencepiece exports with
  transformers 5's default legacy=false, or keeping a Metaspace tokenizer.json's prefix "first",
  fails here from the second turn on."""
  source, eot_token, chat_format = CASES[case]
  tok = data.load_tokenizer(sources[source], eot_token=eot_token, chat_format=chat_format)
  hf_tokenizer.write(str(tmp_path), tok)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  checked = 0
  for turns in conversations():
    messages = [{"role": "assistant" if i % 2 else "user", "content": t}
                for i, t in enumerate(turns)]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok.encode_conversation(turns, 1 << 20, False)[0].tolist(), turns
    prompt = hf_tok.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                        add_generation_prompt=True)
    assert prompt["input_ids"] == tok.encode_prompt(turns[:-1]).tolist()
    checked += len(turns) > 2
  assert checked >= 5  # multi-turn conversations were among them
  assert hf_tok.convert_tokens_to_ids(tok.eot_text) == tok.eot_id


# Through the converters and train.run.

def _messages(turns):
  return [{"role": "assistant" if i % 2 else "user", "content": t} for i, t in enumerate(turns)]


def _chat_ids(hf_dir, turns):
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  return tok.apply_chat_template(_messages(turns), tokenize=True, return_dict=True)["input_ids"]


def test_pad_row_stays_a_pad_row(sources, tmp_path):
  """An HF LLaMA with an added <pad> (vocabulary 1,001): EOT becomes row 1,001, the pad row is
  kept. Counting rows (the old rule) made the pad row EOT: vocabulary 1,001, EOT id 1,000."""
  import torch  # pylint: disable=import-outside-toplevel
  from helpers import random_hf_llama  # pylint: disable=import-outside-toplevel
  from lima_jax import convert  # pylint: disable=import-outside-toplevel
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  hf_dir = tmp_path / "hf"
  model = random_hf_llama(hf_dir, vocab=1000)
  model.resize_token_embeddings(1001, mean_resizing=False)
  with torch.no_grad():
    model.get_input_embeddings().weight[1000] = 0.0
  model.save_pretrained(hf_dir)
  for name in ("tokenizer.json", "tokenizer_config.json"):  # saved by transformers, with <pad>
    shutil.copyfile(os.path.join(sources["metaspace"], name), hf_dir / name)
  assert convert.main(["hf-to-orbax", str(hf_dir), str(tmp_path / "ours")]) == 0
  ours = pretrained.OrbaxParams(str(tmp_path / "ours"))
  assert ours.fields["vocab_size"] == 1002 and ours.eot_id == 1001
  embed = ours.host("embed")
  source = model.get_input_embeddings().weight.detach().numpy()
  np.testing.assert_array_equal(embed[:1001], source)  # the pad row among them, unchanged
  np.testing.assert_allclose(embed[1001], source.mean(0), rtol=1e-6, atol=1e-7)
  # The import carries the tokenizer's files; init_from finds them, with the recorded EOT.
  assert sorted(n for n in os.listdir(tmp_path / "ours") if n.startswith("tokenizer")) == [
      "tokenizer.json", "tokenizer_config.json"]
  tok = ours.tokenizer()
  assert (tok.kind, tok.eot_id, tok.vocab_size) == ("tokenizer.json", 1001, 1002)
  assert tok.sha256 == data.load_tokenizer(str(hf_dir)).sha256


def test_meta_llama3_tiktoken_import_and_export(sources, tmp_path):
  """meta-to-orbax of a LLaMA-3-layout checkpoint with tiktoken ranks and --eot-token
  <|eot_id|> (no new row); orbax-to-hf writes a tokenizer.json that gives training's ids."""
  from helpers import random_hf_llama  # pylint: disable=import-outside-toplevel
  from lima_jax import convert  # pylint: disable=import-outside-toplevel
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  from test_convert import to_meta  # pylint: disable=import-outside-toplevel
  model = random_hf_llama(tmp_path / "hf", vocab=556, kv=2)
  to_meta(model, tmp_path / "meta")
  shutil.copyfile(sources["tiktoken"], tmp_path / "meta" / "tokenizer.model")
  assert convert.main(["meta-to-orbax", str(tmp_path / "meta"), str(tmp_path / "ours"),
                       "--eot-token", "<|eot_id|>"]) == 0
  tok = pretrained.OrbaxParams(str(tmp_path / "ours")).tokenizer()
  assert (tok.kind, tok.vocab_size, tok.eot_id, tok.bos_id) == ("tiktoken", 556, 309, 300)
  assert convert.main(["orbax-to-hf", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
  for turns in conversations()[:12]:
    assert _chat_ids(tmp_path / "out", turns) == tok.encode_conversation(turns, 1 << 20,
                                                                         False)[0].tolist()
  generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "out"))
  # EOT, then the ends Meta's reference stops at: <|end_of_text|>, <|eom_id|> (3.1's name).
  assert (generation.eos_token_id, generation.bos_token_id) == ([309, 301, 308], 300)

  # Training from the Meta directory itself: its first-step loss is transformers' on the ids.
  from lima_jax import train  # pylint: disable=import-outside-toplevel
  chosen = sorted(conversations(), key=lambda c: len("".join(c)))[:4]
  train_path = tmp_path / "train.jsonl"
  train_path.write_text("".join(json.dumps({"conversations": t, "source": "s"}) + "\n"
                                for t in chosen))
  cfg = _lima_7b_from(tmp_path / "meta", train_path, batch_size=len(chosen))
  cfg.data.eot_token = "<|eot_id|>"
  train.run(cfg, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    first = json.loads(f.readline())["loss"]
  examples = [(ids.tolist(), mask.tolist()) for ids, mask in
              (tok.encode_conversation(t, 768, False) for t in chosen)]
  assert first == pytest.approx(_reference_loss(model, examples), abs=2e-4)


def _lima_7b_from(init_from, train_path, *, batch_size):
  """configs/lima_7b.py trained from `init_from` for one step, as a user runs it: no model shape
  flag (the shape comes from the weights), no data.tokenizer_path (init_from carries it); only
  dropout off and fp32 compute, so the loss compares with transformers'."""
  cfg = config.from_file(os.path.join(os.path.dirname(config_cli.DEFAULT_CONFIG), "lima_7b.py"))
  cfg.init_from, cfg.data.tokenizer_path = str(init_from), ""
  cfg.data.train_path, cfg.data.dev_path, cfg.data.max_length = str(train_path), "", 768
  cfg.train.batch_size, cfg.train.epochs, cfg.train.stop_after_steps = batch_size, 1, 1
  cfg.checkpoint.async_save, cfg.eval.generate_epochs = False, ()
  cfg.model.residual_dropout_top, cfg.model.compute_dtype = 0.0, "float32"
  return cfg


def _reference_loss(model, examples) -> float:
  """transformers' mean cross entropy over the masked targets of all `examples`."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)  # JAX's threads share the cores
  total = count = 0.0
  with torch.no_grad():
    for ids, mask in examples:
      logits = model(torch.tensor([ids])).logits[0, :-1].double()
      ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
      total += float((ce * torch.tensor(mask[1:], dtype=torch.float64)).sum())
      count += float(np.sum(mask[1:]))
  return total / count


@pytest.mark.parametrize("chat_format", ["lima", "template"])
def test_first_step_loss_matches_transformers(sources, tmp_path, chat_format):
  """Training from an HF dir holding only a byte-level BPE tokenizer.json (init_from, no
  data.tokenizer_path): the first step's loss equals transformers' on ids built here from the
  tokenizer itself (lima: each turn + a new EOT row, the mean of the source rows; template:
  apply_chat_template and its assistant mask, EOT <|im_end|>). Then the export's
  apply_chat_template gives those ids and its generation stops on EOT. A zero or random EOT row,
  or a misplaced mask, moves the loss far beyond 2e-4."""
  import torch  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  from helpers import random_hf_llama  # pylint: disable=import-outside-toplevel
  from lima_jax import convert, train  # pylint: disable=import-outside-toplevel
  hf_dir = tmp_path / "hf"
  shutil.copytree(sources["bpe"], hf_dir)
  ref_tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  count = ref_tok.get_vocab_size(with_added_tokens=True)
  model = random_hf_llama(hf_dir, vocab=count, kv=2, tied=True)
  hf_chat = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  # The three shortest multi-turn conversations and the three shortest others.
  by_length = sorted(conversations(), key=lambda c: len("".join(c)))
  examples, chosen = [], []
  for turns in [c for c in by_length if len(c) > 2][:3] + [c for c in by_length if len(c) == 2][:3]:
    if chat_format == "lima":
      ids = [i for t in turns for i in ref_tok.encode(t, add_special_tokens=False).ids + [count]]
      mask = [float(k % 2) for k, t in enumerate(turns)
              for _ in range(len(ref_tok.encode(t, add_special_tokens=False).ids) + 1)]
    else:
      out = hf_chat.apply_chat_template(_messages(turns), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
      ids, mask = out["input_ids"], [float(m) for m in out["assistant_masks"]]
    if len(ids) <= 768 and len(chosen) < 6:
      examples.append((ids, mask))
      chosen.append(turns)
  assert len(chosen) == 6 and sum(len(t) > 2 for t in chosen) == 3
  train_path = tmp_path / "train.jsonl"
  train_path.write_text("".join(json.dumps({"conversations": t, "source": "s"}) + "\n"
                                for t in chosen))

  cfg = _lima_7b_from(hf_dir, train_path, batch_size=len(chosen))
  cfg.data.chat_format = chat_format
  cfg.data.eot_token = "<|im_end|>" if chat_format == "template" else ""
  workdir = tmp_path / "run"
  train.run(cfg, str(workdir))
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    first = json.loads(f.readline())["loss"]

  if chat_format == "lima":  # LIMA's EOT: a new row, the mean of the source rows
    model.resize_token_embeddings(count + 1, mean_resizing=False)
    with torch.no_grad():
      for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        table[count] = table[:count].mean(0)
  assert first == pytest.approx(_reference_loss(model, examples), abs=2e-4)

  out = tmp_path / "export"
  assert convert.main(["orbax-to-hf", str(workdir), str(out)]) == 0
  for turns, (ids, _) in zip(chosen, examples):
    assert _chat_ids(out, turns) == ids
  # EOT, then the tokenizer's eos_token (<|im_end|>, id 2), once.
  stops = [count, 2] if chat_format == "lima" else 2
  assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == stops


def test_run_config_errors_name_the_key(tmp_path):
  """train.prepare refuses an EOT the tokenizer lacks and an unknown chat format in one line,
  before anything is written."""
  from lima_jax import train  # pylint: disable=import-outside-toplevel
  cfg = config.from_file(config_cli.DEFAULT_CONFIG)
  cfg.mesh.cpu_devices = 0
  cfg.data.eot_token = "<|eot_id|>"
  with pytest.raises(LimaError, match=r"^config data\.eot_token: '<\|eot_id\|>' is not a token"):
    train.prepare(cfg, str(tmp_path))
  cfg.data.eot_token, cfg.data.chat_format = "", "chatml"
  with pytest.raises(LimaError, match=r"^config data\.chat_format: must be one of"):
    train.prepare(cfg, str(tmp_path))
  assert not os.listdir(tmp_path)
