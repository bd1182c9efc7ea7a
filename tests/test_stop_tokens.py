"""Generation stops at EOT and at the model's own end ids, on every path, for imported models.

The models are built here so that they emit one of their end ids at once, whatever the prompt:
every embedding holds a constant in dimension 0, no layer writes that dimension, and only the
chosen token's LM-head row reads it. Stopping at EOT alone (as before) lets them run to the
token limit and marks their answers "length".
"""

import json
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import random_hf_llama  # pylint: disable=wrong-import-position
from test_tokenizers import _lima_7b_from, build_bpe_dir  # pylint: disable=wrong-import-position
from lima_jax import convert, generate, train  # pylint: disable=wrong-import-position
from lima_jax.prompts import read_jsonl  # pylint: disable=wrong-import-position
from lima_jax.weights import pretrained  # pylint: disable=wrong-import-position

MAX_NEW = 12


def always_emits(model, token: int):
  """Makes `token` the arg max after any prompt (an untied transformers LLaMA, in place)."""
  with torch.no_grad():
    model.get_input_embeddings().weight[:, 0] = 5.0
    for layer in model.model.layers:
      layer.self_attn.o_proj.weight[0] = 0.0
      layer.mlp.down_proj.weight[0] = 0.0
    model.model.norm.weight[0] = 1.0
    head = model.get_output_embeddings().weight
    head[:, 0] = 0.0
    head[token, 0] = 50.0
  return model


def _train_file(path):
  turns = [["What is 12 + 30?", "42."], ["Name a colour.", "Blue."]]
  path.write_text("".join(json.dumps({"conversations": t, "source": "s"}) + "\n" for t in turns))
  return path


def test_hf_model_stops_at_its_generation_config_end_ids(tmp_path):
  """An HF directory whose generation_config.json lists several end ids (as LLaMA-3.x lists
  <|end_of_text|>, <|eom_id|>, <|eot_id|>), its weights emitting the one that is not the
  tokenizer's eos_token: `convert hf-to-orbax`, then a run from the import (a new EOT row):
  its epoch-0 dev answers and `python -m lima_jax.generate`'s stop there ("eot", one token);
  `orbax-to-hf` writes EOT and the source's end ids, and transformers' generate on the export
  stops there too."""
  hf_dir = build_bpe_dir(tmp_path / "hf")  # <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
  count = len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"])
  model = always_emits(random_hf_llama(hf_dir, vocab=count, kv=2), 0)
  model.save_pretrained(hf_dir)
  (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  imported = tmp_path / "imported"
  assert convert.main(["hf-to-orbax", str(hf_dir), str(imported)]) == 0
  tok = pretrained.OrbaxParams(str(imported)).tokenizer()
  assert tok.stop_ids == (count, 2, 0)  # EOT (a new row) first, then the model's own

  train_path = _train_file(tmp_path / "train.jsonl")
  cfg = _lima_7b_from(imported, train_path, batch_size=2)
  cfg.data.dev_path, cfg.eval.generate_epochs = str(train_path), (0,)
  cfg.eval.max_new_tokens = MAX_NEW
  workdir = tmp_path / "run"
  train.run(cfg, str(workdir))
  dev = read_jsonl(str(workdir / "generations" / "epoch_0.jsonl"))
  out = tmp_path / "answers.jsonl"
  generate.main(["--workdir", str(workdir), "--epoch", "0", "--prompts", str(train_path),
                 "--out", str(out), "--max_tokens", str(MAX_NEW)])
  for records in (dev, read_jsonl(str(out))):
    assert [(r["stopped"], r["tokens"], r["generation"]) for r in records] == [("eot", 1, "")] * 2

  export = tmp_path / "export"
  assert convert.main(["orbax-to-hf", str(workdir), str(export)]) == 0
  generation = transformers.GenerationConfig.from_pretrained(str(export))
  assert generation.eos_token_id == [count, 2, 0]
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(export)).eval()
  prompt = torch.tensor([tok.encode_prompt(["What is 12 + 30?"]).tolist()])
  with torch.no_grad():
    new = exported.generate(prompt, do_sample=False, max_new_tokens=MAX_NEW)[0, prompt.shape[1]:]
  assert new.tolist() == [0]


def test_gguf_model_stops_at_its_eot_and_eom_ids(tmp_path):
  """A GGUF naming eos (the import's EOT by default), eot and eom ids, its weights emitting the
  eot id: the import's stop ids are all three (and the tokens llama.cpp ends at by their text,
  here the same); the Generator stops at the eot id with those
  (ChatTokenizer.stop_ids, what every generation path passes), and `gguf-to-hf` writes them as
  generation_config.json's eos_token_id."""
  # pylint: disable=import-outside-toplevel
  import optax
  from test_gguf import byte_level_bpe, random_llama, write_gguf
  from lima_jax import sharding
  from lima_jax.decoding import Decoding, Generator
  from lima_jax.model import LlamaConfig
  from lima_jax.train_state import Trainer
  bpe = byte_level_bpe()
  model = always_emits(random_llama(bpe.get_vocab_size(), tied=False, seed=5), 2)
  path = str(tmp_path / "model.gguf")
  write_gguf(path, model, bpe, eos=0, eot=2, eom=1)  # <|endoftext|>, <|im_end|>, <|im_start|>
  assert convert.main(["gguf-to-orbax", path, str(tmp_path / "ckpt")]) == 0
  source = pretrained.OrbaxParams(str(tmp_path / "ckpt"))
  tok = source.tokenizer()
  assert (tok.eot_id, tok.stop_ids) == (0, (0, 2, 1))

  trainer = Trainer(LlamaConfig(**source.fields), optax.identity(), optax.constant_schedule(0.0),
                    sharding.make_mesh(1, -1, 1), 0)
  params = source.restore(trainer.abstract_state["params"])
  prompts = [tok.encode_prompt([q]) for q in ("What is 12 + 30?", "Name a colour.")]
  for stops, want in ((tok.stop_ids, [[2], [2]]), (tok.eot_id, None)):
    got = Generator(trainer, stops, 2).generate(params, prompts, max_new=MAX_NEW, context=64,
                                                decoding=Decoding(greedy=True))
    if want is not None:
      assert [g.tolist() for g in got] == want
    else:  # EOT alone, as before: the answers run to the limit
      assert [len(g) for g in got] == [MAX_NEW, MAX_NEW]

  assert convert.main(["gguf-to-hf", path, str(tmp_path / "hf")]) == 0
  generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
  assert generation.eos_token_id == [0, 2, 1]
