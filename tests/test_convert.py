"""Weight conversion against transformers: small random LLaMAs in, logits compared, and back out."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import random_hf_llama  # pylint: disable=wrong-import-position
from lima_jax import config, config_cli, convert, sharding, train  # pylint: disable=wrong-import-position
from lima_jax.errors import LimaError  # pylint: disable=wrong-import-position
from lima_jax.model import LlamaConfig  # pylint: disable=wrong-import-position
from lima_jax.train_state import Trainer  # pylint: disable=wrong-import-position
from lima_jax.weights import pretrained  # pylint: disable=wrong-import-position

PIECES = 1000  # the sample tokenizer's pieces: our vocabulary is 1001 with EOT
TOKENIZER = config.sample_data("tokenizer.model")
LENGTH = 24


def make_hf(path, *, d=64, heads=4, kv=4, ffn=96, tied=False, theta=10_000.0, seed=0):
  """A random HF LLaMA saved as safetensors with the sample tokenizer beside it."""
  model = random_hf_llama(path, vocab=PIECES, d=d, heads=heads, kv=kv, ffn=ffn, tied=tied,
                          theta=theta, seed=seed)
  shutil.copyfile(TOKENIZER, os.path.join(path, "tokenizer.model"))
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def tokens_batch(seed=0):
  tokens = np.random.default_rng(seed).integers(0, PIECES, (2, LENGTH)).astype(np.int32)
  return tokens


def our_logits(ckpt_dir, tokens, mesh=None):
  source = pretrained.OrbaxParams(str(ckpt_dir))
  mesh = mesh or sharding.make_mesh(1, -1, 1)
  trainer = Trainer(LlamaConfig(**source.fields), optax.identity(),
                    optax.constant_schedule(0.0), mesh, 0)
  params = source.restore(trainer.abstract_state["params"])
  positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
  forward = jax.jit(lambda p, t, q, s: trainer.model(p)(t, q, s))
  return np.asarray(forward(params, tokens, positions, np.ones_like(tokens))), params


def to_meta(model, path, shards=1):
  """The same weights in Meta's layout: renamed, q/k rows with interleaved rotary pairs, split
  over `shards` model-parallel files as Meta's larger releases are."""
  cfg = model.config
  hd = cfg.hidden_size // cfg.num_attention_heads

  def interleave(w, heads):
    return w.reshape(heads, 2, hd // 2, -1).transpose(1, 2).reshape(heads * hd, -1)

  names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
           "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
           "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
           "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm"}
  out = {}
  for key, w in model.state_dict().items():
    w = w.clone()
    if key.startswith("model.layers."):
      _, _, layer, rest = key.split(".", 3)
      module = rest.rsplit(".", 1)[0]
      if module == "self_attn.q_proj":
        w = interleave(w, cfg.num_attention_heads)
      elif module == "self_attn.k_proj":
        w = interleave(w, cfg.num_key_value_heads)
      out[f"layers.{layer}.{names[module]}.weight"] = w
    elif key == "model.embed_tokens.weight":
      out["tok_embeddings.weight"] = w
    elif key == "model.norm.weight":
      out["norm.weight"] = w
    elif key == "lm_head.weight" and not cfg.tie_word_embeddings:
      out["output.weight"] = w
  os.makedirs(path)
  for i in range(shards):
    part = {}
    for key, w in out.items():
      if key.endswith(("norm.weight",)):
        part[key] = w
      else:  # column-parallel layers split outputs, row-parallel ones (and the embedding) inputs
        axis = 1 if key.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
        part[key] = w.chunk(shards, dim=axis)[i].clone()
    torch.save(part, os.path.join(path, f"consolidated.{i:02d}.pth"))
  with open(os.path.join(path, "params.json"), "w", encoding="utf-8") as f:
    json.dump({"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
               "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
               "vocab_size": -1, "norm_eps": cfg.rms_norm_eps,
               "rope_theta": cfg.rope_parameters["rope_theta"], "multiple_of": 32}, f)
  shutil.copyfile(TOKENIZER, os.path.join(path, "tokenizer.model"))


CASES = {
    "mha-untied-10k": dict(d=64, heads=4, kv=4, tied=False, theta=10_000.0),
    "gqa-tied-500k": dict(d=64, heads=4, kv=2, tied=True, theta=500_000.0),
    "6heads-2kv-untied-500k": dict(d=96, heads=6, kv=2, ffn=160, tied=False, theta=500_000.0),
    "3heads-mha-tied-10k": dict(d=96, heads=3, kv=3, tied=True, theta=10_000.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_import_matches_transformers(tmp_path, case):
  model = make_hf(tmp_path / "hf", **CASES[case])
  assert convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
  tokens = tokens_batch()
  ours, params = our_logits(tmp_path / "ours", tokens)
  ref = hf_logits(model, tokens)
  np.testing.assert_allclose(ours[..., :PIECES], ref, atol=1e-4, rtol=0)
  assert (ours[..., PIECES + 1:] < -1e30).all()  # padding columns are masked

  embed = np.asarray(params["embed"])
  np.testing.assert_allclose(embed[PIECES], embed[:PIECES].mean(0), rtol=1e-6, atol=1e-7)
  assert not embed[PIECES + 1:].any()
  if "lm_head" in params:
    head = np.asarray(params["lm_head"])
    np.testing.assert_allclose(head[:, PIECES], head[:, :PIECES].mean(1), rtol=1e-6, atol=1e-7)
    assert not head[:, PIECES + 1:].any()


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_layout_gives_the_same_logits(tmp_path, shards):
  model = make_hf(tmp_path / "hf", **CASES["6heads-2kv-untied-500k"])
  to_meta(model, tmp_path / "meta", shards)
  assert convert.main(["meta-to-orbax", str(tmp_path / "meta"), str(tmp_path / "ours")]) == 0
  tokens = tokens_batch(1)
  ours, _ = our_logits(tmp_path / "ours", tokens)
  np.testing.assert_allclose(ours[..., :PIECES], hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path):
  make_hf(tmp_path / "hf", **CASES["gqa-tied-500k"])
  assert convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "a")]) == 0
  assert convert.main(["orbax-to-hf", str(tmp_path / "a"), str(tmp_path / "hf2"),
                       "--shard-gb", "0.0001"]) == 0  # several shards + an index
  assert convert.main(["hf-to-orbax", str(tmp_path / "hf2"), str(tmp_path / "b")]) == 0
  tokens = tokens_batch(2)
  logits_a, params_a = our_logits(tmp_path / "a", tokens)
  _, params_b = our_logits(tmp_path / "b", tokens)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    assert np.array_equal(np.asarray(a), np.asarray(b))

  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf2")).eval()
  assert exported.config.rope_parameters["rope_theta"] == 500_000.0
  np.testing.assert_allclose(logits_a[..., :PIECES + 1], hf_logits(exported, tokens),
                             atol=1e-4, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf2"))
  assert tok.eos_token_id == PIECES  # EOT; generation also stops at the source's </s> (2)
  assert exported.generation_config.eos_token_id == [PIECES, 2]


def _train_config(init_from, **model):
  cfg = config.from_file(config_cli.DEFAULT_CONFIG)
  cfg.init_from = init_from
  cfg.data.dev_path = ""
  cfg.data.max_length = 256
  cfg.train.epochs = 2
  cfg.optimizer.learning_rate = 1e-3
  cfg.optimizer.end_learning_rate = 1e-3
  cfg.mesh.cpu_devices = 0  # the test process already has 8 devices
  cfg.checkpoint.async_save = False
  dims = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
              rope_theta=10_000.0, norm_eps=1e-5, residual_dropout_top=0.0)
  for key, value in {**dims, **model}.items():
    cfg.model[key] = value
  return cfg


def test_train_from_hf_dir_then_generate_in_transformers(tmp_path):
  make_hf(tmp_path / "hf", d=64, heads=4, kv=2, ffn=96)
  workdir = tmp_path / "run"
  train.run(_train_config(str(tmp_path / "hf")), str(workdir))
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert len(losses) >= 4 and losses[-1] < losses[0]

  assert convert.main(["orbax-to-hf", str(workdir), str(tmp_path / "out")]) == 0
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  prompt = tok("Hello there", return_tensors="pt")
  out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
  assert out.shape[1] > prompt["input_ids"].shape[1]


def test_init_from_refuses_a_command_line_shape_mismatch(tmp_path):
  make_hf(tmp_path / "hf", d=64, heads=4, kv=4, ffn=96)
  cfg = _train_config(str(tmp_path / "hf"), n_kv_heads=2)
  fields, _, _ = pretrained.source_info(str(tmp_path / "hf"))
  # The config file's value yields to the weights; the same value given as a flag is refused.
  assert train.model_config(cfg.model, PIECES + 1, fields).n_kv_heads == 4
  with pytest.raises(LimaError,
                     match=r"^--config\.model\.n_kv_heads=2: init_from holds n_kv_heads=4;"):
    train.model_config(cfg.model, PIECES + 1, fields, pinned={"n_kv_heads"})


def test_init_from_our_dir_loads_the_converted_params(tmp_path):
  make_hf(tmp_path / "hf", d=64, heads=4, kv=2, ffn=96)
  convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "ours")])
  cfg = _train_config(str(tmp_path / "ours"))
  mesh = sharding.make_mesh(2, 2, 2)
  model_cfg = train.model_config(cfg.model, PIECES + 1)
  trainer = Trainer(model_cfg, optax.adamw(1e-3), optax.constant_schedule(1e-3), mesh, 0)
  tokenizer = pretrained.run_tokenizer(str(tmp_path / "ours"), "")
  state = pretrained.init_state(trainer, str(tmp_path / "ours"), tokenizer.meta())
  _, expected = our_logits(tmp_path / "ours", tokens_batch())
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(expected)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert int(state["step"]) == 0


def _cli_error(capsys, *argv):
  assert convert.main(list(argv)) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_wrong_input_gets_one_line_errors(tmp_path, capsys):
  hf_dir = tmp_path / "hf"
  make_hf(hf_dir, d=64, heads=4, kv=2, ffn=96)
  capsys.readouterr()  # transformers' progress output while saving
  out = str(tmp_path / "out")

  (tmp_path / "empty").mkdir()
  assert "no config.json" in _cli_error(capsys, "hf-to-orbax", str(tmp_path / "empty"), out)
  assert "not a lima_jax checkpoint" in _cli_error(capsys, "orbax-to-hf", str(hf_dir / ".."), out)
  assert "no params.json" in _cli_error(capsys, "meta-to-orbax", str(hf_dir), out)

  config_path = hf_dir / "config.json"
  config = json.loads(config_path.read_text())
  config_path.write_text(json.dumps(dict(config, architectures=["MistralForCausalLM"],
                                         model_type="mistral")))
  assert "MistralForCausalLM" in _cli_error(capsys, "hf-to-orbax", str(hf_dir), out)
  config_path.write_text(json.dumps(dict(config, num_key_value_heads=4)))
  err = _cli_error(capsys, "hf-to-orbax", str(hf_dir), out)
  assert "model.layers.0.self_attn.k_proj.weight has shape (32, 64)" in err
  config_path.write_text(json.dumps(config))

  index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
  (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
  assert "model-00002-of-00002.safetensors" in _cli_error(capsys, "hf-to-orbax", str(hf_dir), out)
  (hf_dir / "model.safetensors.index.json").unlink()
  (hf_dir / "model.safetensors").unlink()
  assert "no *.safetensors" in _cli_error(capsys, "hf-to-orbax", str(hf_dir), out)
