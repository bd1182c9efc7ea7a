"""Today's LLaMA-family sources end to end: RoPE scaling (LLaMA-3.1) against transformers, and
the model's shape taken from the weights by `train` and `plan`, refused before anything is written
when it cannot train."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=wrong-import-position
from helpers import ROOT, randomize
from test_convert import PIECES, TOKENIZER, hf_logits, our_logits, to_meta

from lima_jax import config, config_cli, convert, data, plan, plan_report, topology, train
from lima_jax.errors import LimaError
from lima_jax.weights import pretrained

# DESIGN.md 11: sizes at which LLaMA-3.1's scaling visibly moves a first-step loss.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def make_scaled_hf(path, rope, *, theta=10_000.0, seed=0, vocab=PIECES, **dims):
  """A random HF LLaMA with `rope` scaling and the sample sentencepiece tokenizer. q/k weights
  of std 0.4 make the attention depend strongly on the rotary angles."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=512,
      rope_parameters=dict(rope, rope_theta=theta), **dict(DIMS, **dims))
  model = randomize(transformers.LlamaForCausalLM(cfg).eval(), qk_std=0.4)
  model.save_pretrained(path)
  shutil.copyfile(TOKENIZER, os.path.join(path, "tokenizer.model"))
  return model


def unscaled(model):
  """The same weights with plain RoPE: the reference a broken scaling would match."""
  cfg = transformers.LlamaConfig.from_dict(model.config.to_dict())
  cfg.rope_parameters = {"rope_type": "default",
                         "rope_theta": model.config.rope_parameters["rope_theta"]}
  plain = transformers.LlamaForCausalLM(cfg).eval()
  plain.load_state_dict(model.state_dict())
  return plain


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_scaled_rope_logits_match_transformers_and_survive_export(tmp_path, rope):
  model = make_scaled_hf(tmp_path / "hf", rope)
  assert convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
  fields = pretrained.OrbaxParams(str(tmp_path / "ours")).fields  # stored with the params
  assert fields["rope_scaling_type"] == rope["rope_type"]
  assert fields["rope_scaling_factor"] == rope["factor"]
  # 512 positions: 8x the original context of the llama3 case.
  tokens = np.random.default_rng(0).integers(0, PIECES, (1, 512)).astype(np.int32)
  ours, _ = our_logits(tmp_path / "ours", tokens)
  ref = hf_logits(model, tokens)
  np.testing.assert_allclose(ours[..., :PIECES], ref, atol=1e-4, rtol=0)
  # Without the scaling the reference moves by far more than the tolerance.
  assert np.abs(hf_logits(unscaled(model), tokens) - ref).max() > 0.5

  assert convert.main(["orbax-to-hf", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  for key in ("rope_parameters", "rope_scaling"):  # transformers 5 and older spellings
    assert {k: written[key][k] for k in rope} == rope, key
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(hf_logits(exported, tokens)[..., :PIECES], ref, atol=1e-4, rtol=0)


def test_meta_use_scaled_rope_is_llama31s_scaling(tmp_path):
  """params.json says only use_scaled_rope; Meta's reference fixes factor 8, low 1, high 4 and
  an original context of 8,192. head_dim 16 at theta 10,000 has wavelengths past 8,192, so those
  values change the logits even on short data."""
  rope = dict(LLAMA3_ROPE, original_max_position_embeddings=8192)
  model = make_scaled_hf(tmp_path / "hf", rope)
  to_meta(model, tmp_path / "meta")
  params_path = tmp_path / "meta" / "params.json"
  params_path.write_text(json.dumps(dict(json.loads(params_path.read_text()),
                                         use_scaled_rope=True)))
  assert convert.main(["meta-to-orbax", str(tmp_path / "meta"), str(tmp_path / "ours")]) == 0
  tokens = np.random.default_rng(1).integers(0, PIECES, (2, 24)).astype(np.int32)
  ours, _ = our_logits(tmp_path / "ours", tokens)
  ref = hf_logits(model, tokens)
  np.testing.assert_allclose(ours[..., :PIECES], ref, atol=1e-4, rtol=0)
  assert np.abs(hf_logits(unscaled(model), tokens) - ref).max() > 1e-2


def test_other_rope_types_are_refused_naming_them(tmp_path):
  make_scaled_hf(tmp_path / "hf", LLAMA3_ROPE)
  path = tmp_path / "hf" / "config.json"
  cfg = json.loads(path.read_text())
  path.write_text(json.dumps(dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 4.0})))
  with pytest.raises(LimaError, match=r"config\.json: rope_scaling\.rope_type='yarn' is not "):
    pretrained.source_info(str(tmp_path / "hf"))
  del cfg["rope_parameters"]["low_freq_factor"]
  path.write_text(json.dumps(cfg))
  with pytest.raises(LimaError, match=r"rope_parameters\.low_freq_factor is missing"):
    pretrained.source_info(str(tmp_path / "hf"))


def _run_config(init_from, workdir_max_length=512):
  """The toy run (8 devices over data, fsdp and tensor) from `init_from`, no model.* key set:
  the shape comes from the weights."""
  cfg = config.from_file(config_cli.DEFAULT_CONFIG)
  cfg.init_from = str(init_from)
  cfg.data.dev_path = ""
  cfg.data.max_length = workdir_max_length
  cfg.train.epochs = 1
  cfg.train.stop_after_steps = 1
  cfg.train.compile_cache_dir = ""
  cfg.mesh.cpu_devices = 0  # the test process already has 8 devices
  cfg.checkpoint.async_save = False
  cfg.model.residual_dropout_top = 0.0
  cfg.model.compute_dtype = "float32"
  return cfg


def _reference_loss(model, examples, ids):
  """transformers' mean cross entropy over the step's target tokens, example by example (the
  same ids and mask as our packed rows), with our EOT row (the mean of the others) appended."""
  model.resize_token_embeddings(PIECES + 1, mean_resizing=False)
  with torch.no_grad():
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
      table[PIECES] = table[:PIECES].double().mean(0).float()
  total = count = 0.0
  with torch.no_grad():
    for i in ids:
      tokens = torch.tensor(examples[i].ids[None].astype(np.int64))
      logits = model(tokens).logits[0, :-1].double()
      ce = torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")
      mask = torch.tensor(examples[i].loss_mask[1:].astype(np.float64))
      total += float((ce * mask).sum())
      count += float(mask.sum())
  return total / count


def test_first_step_loss_from_a_llama31_dir_equals_transformers(tmp_path):
  """DESIGN.md 11: with these sizes the unscaled reference is ~7e-3 away, the tolerance 2e-4."""
  model = make_scaled_hf(tmp_path / "hf", LLAMA3_ROPE)
  cfg = _run_config(tmp_path / "hf")
  workdir = tmp_path / "run"
  train.run(cfg, str(workdir))
  first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])["loss"]

  tokenizer = data.load_tokenizer(cfg.data.tokenizer_path)
  examples = data.load_examples(cfg.data.train_path, tokenizer, max_length=cfg.data.max_length,
                                train_on_prompt=False, data_dir=str(tmp_path / "tfds"))
  ids = data.EpochPlan(len(examples), cfg.train.batch_size, cfg.seed).example_ids(0)
  assert max(len(examples[i].ids) for i in ids) > 64  # past the original context
  plain = _reference_loss(unscaled(model), examples, ids)
  scaled = _reference_loss(model, examples, ids)
  assert abs(first - scaled) < 2e-4, (first, scaled)
  assert abs(plain - scaled) > 1e-3, (plain, scaled)

  saved = pretrained.OrbaxParams(str(workdir)).fields  # the run's metadata keeps the scaling
  assert (saved["rope_scaling_type"], saved["rope_scaling_original_max_position"],
          saved["d_model"], saved["n_kv_heads"]) == ("llama3", 64, 64, 2)


def test_a_vocabulary_mismatch_is_refused_before_anything_is_written(tmp_path):
  make_scaled_hf(tmp_path / "hf", LLAMA3_ROPE, vocab=PIECES - 3)
  workdir = tmp_path / "run"
  workdir.mkdir()
  with pytest.raises(LimaError, match=r"^data\.tokenizer_path: .*defines 1000 tokens, but the "
                                      r"weights have only 997"):
    train.run(_run_config(tmp_path / "hf"), str(workdir))
  assert not os.listdir(workdir)  # no TFDS copy, no checkpoints


def _train_cli(*args):
  env = dict(os.environ, XLA_FLAGS="")
  return subprocess.run(
      [sys.executable, "-m", "lima_jax.train", "--config=configs/lima_7b.py", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_cli_trains_a_source_with_no_model_flag_and_refuses_disagreeing_ones(tmp_path):
  make_scaled_hf(tmp_path / "hf", LLAMA3_ROPE, num_key_value_heads=4)
  common = [f"--config.init_from={tmp_path / 'hf'}",
            f"--config.data.train_path={config.sample_data('train.jsonl')}",
            f"--config.data.tokenizer_path={TOKENIZER}", "--config.data.max_length=256",
            "--config.train.stop_after_steps=1", "--config.train.compile_cache_dir=",
            "--config.checkpoint.async_save=False"]
  refused = tmp_path / "refused"
  refused.mkdir()
  # n_layers agrees with the weights; d_model and n_kv_heads do not.
  result = _train_cli(*common, f"--workdir={refused}", "--config.model.n_layers=2",
                      "--config.model.d_model=128", "--config.model.n_kv_heads=2")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      f"error: --config.model.d_model=128, --config.model.n_kv_heads=2: init_from "
      f"{tmp_path / 'hf'} holds d_model=64, n_kv_heads=4; drop the flags (with init_from the "
      "model's shape comes from its weights)"]
  assert not os.listdir(refused)

  # lima_7b.py says 4096 x 32 layers and no scaling: they yield to the weights.
  result = _train_cli(*common, f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  saved = pretrained.OrbaxParams(str(tmp_path / "run")).fields
  assert (saved["d_model"], saved["n_layers"], saved["n_kv_heads"], saved["ffn_dim"],
          saved["rope_scaling_type"], saved["vocab_size"]) == (64, 2, 4, 96, "llama3", PIECES + 1)


def test_plan_takes_the_shape_from_config_json_alone(tmp_path):
  make_scaled_hf(tmp_path / "hf", LLAMA3_ROPE)
  for name in os.listdir(tmp_path / "hf"):
    if name != "config.json":  # no weights, no tokenizer: the planner needs neither
      os.remove(tmp_path / "hf" / name)
  cfg = config.from_file(os.path.join(ROOT, "configs", "llama31_70b.py"))
  cfg.init_from = str(tmp_path / "hf")
  cfg.data.max_length = 512
  report = plan.plan_run(cfg, topology.parse("cpu:8"), num_examples=100)
  m = report["model"]
  assert (m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"], m["ffn_dim"]) == (
      64, 2, 4, 2, 96)
  assert (m["rope_scaling_type"], m["rope_scaling_original_max_position"]) == ("llama3", 64)
  assert report["vocab_size"] == PIECES + 1 and len(report["dropout_per_layer"]) == 2
  assert "llama3 scaling x8 (low 1, high 4, original 64)" in plan_report.render(report, "x")

  cfg.data.tokenizer_path = TOKENIZER  # 1,000 pieces: the weights' 1,000 rows fit
  assert plan.plan_run(cfg, topology.parse("cpu:8"), num_examples=100)["vocab_size"] == PIECES + 1
  # A disagreeing key given on the command line is refused; an agreeing one is not named.
  with pytest.raises(LimaError, match=r"^--config\.model\.n_heads=64: init_from holds n_heads=4; "):
    train.model_config(cfg.model, PIECES + 1, report["model"],
                       pinned={"n_heads", "rope_scaling_type"})
