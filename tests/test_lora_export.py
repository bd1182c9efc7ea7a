"""A LoRA run's exports through the CLIs a user runs: the merged model (HF and our params dir)
and the adapters alone in PEFT's format, checked against our forward with the adapters and
against transformers / peft on an HF base built here."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import ROOT  # pylint: disable=wrong-import-position
from test_convert import PIECES, hf_logits, make_hf, our_logits  # pylint: disable=wrong-import-position
from lima_jax import config, convert, generate, run_files, select, train  # pylint: disable=wrong-import-position
from lima_jax.weights import pretrained, safetensors_io  # pylint: disable=wrong-import-position

LENGTH = 16


def lora_run(base: str, workdir: str, eot_token: str = "", param_dtype: str = "float32") -> str:
  """A LoRA run of 2 steps from the HF dir `base` at a learning rate high enough that the
  adapters' B (zero at the start) moves far from zero; epoch 1's params kept for --choose.
  param_dtype: the frozen base's."""
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.model.param_dtype = param_dtype
  cfg.init_from = base
  cfg.data.dev_path = ""
  cfg.data.eot_token = eot_token
  cfg.data.max_length = 128
  cfg.train.batch_size, cfg.train.epochs = 36, 1
  cfg.eval.generate_epochs = (1,)
  cfg.model.residual_dropout_top = 0.0
  cfg.optimizer.warmup_steps = 0
  cfg.optimizer.learning_rate = cfg.optimizer.end_learning_rate = 0.05
  cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 4, 8.0, "q,k,v,o,gate,up,down"
  cfg.mesh.cpu_devices = 0  # the test process already has 8 devices
  cfg.checkpoint.async_save = False
  train.run(cfg, workdir)
  return workdir


def tokens_batch(vocab: int, seed: int = 0) -> np.ndarray:
  """Ids below `vocab`, EOT (the last id) among them so a new EOT row is read."""
  tokens = np.random.default_rng(seed).integers(0, vocab, (2, LENGTH)).astype(np.int32)
  tokens[:, 5] = vocab - 1
  return tokens


def run_logits(workdir: str, tokens: np.ndarray) -> np.ndarray:
  """Our forward with the adapters (not merged) on epoch 1's params, fp32 as the toy computes."""
  kept = run_files.locate(workdir, epoch=1)
  source, _ = generate.open_kept(kept)
  trainer, params = generate.restore_kept(kept, source)
  assert trainer.uses_lora and trainer.model_cfg.compute_dtype == "float32"
  adapter_b = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)
               if "lora_b" in jax.tree_util.keystr(p)]
  assert adapter_b and min(np.abs(b).max() for b in adapter_b) > 0.05  # B moved from zero
  for eot in trainer.trained.token_rows:  # a new EOT's rows trained away from the base's mean
    base = jax.device_get(pretrained.lora_base(kept.meta, trainer))
    tables = jax.device_get({k: params[k] for k in base if k in ("embed", "lm_head")})
    assert np.abs(tables["embed"][eot] - base["embed"][eot]).max() > 0.01
    np.testing.assert_array_equal(np.delete(tables["embed"], eot, 0), np.delete(base["embed"], eot, 0))
    if "lm_head" in tables:
      assert np.abs(tables["lm_head"][:, eot] - base["lm_head"][:, eot]).max() > 0.01
  positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
  forward = jax.jit(lambda p, t, q, s: trainer.model(p)(t, q, s))
  return np.asarray(forward(params, tokens, positions, np.ones_like(tokens)))


@pytest.fixture(scope="module")
def new_eot(tmp_path_factory):
  """(HF base dir, LoRA workdir) with LIMA's EOT a new row the base lacks (its rows train)."""
  root = tmp_path_factory.mktemp("new_eot")
  make_hf(root / "hf", d=64, heads=4, kv=2, ffn=96)
  workdir = lora_run(str(root / "hf"), str(root / "run"))
  kept = run_files.locate(workdir, epoch=1)
  assert generate.restore_kept(kept, generate.open_kept(kept)[0])[0].trained.token_rows == (
      PIECES,)
  return str(root / "hf"), workdir


def test_merges_of_a_bf16_base_keep_the_dtype_asked_for(tmp_path):
  """A LoRA run on a bf16 base: the fp32 exports (convert --dtype=float32; select --choose hf
  and orbax, whose merge is fp32 by default) fold W + scale A B in fp32 and keep it there, so
  transformers on the HF export and our forward on the orbax export give the logits of our fp32
  forward with the adapters to 2e-5. Rounded to the base's bf16 first (as before), the fp32 HF
  export's logits were off by up to 0.017. --dtype=bfloat16 still writes a bf16 model."""
  make_hf(tmp_path / "hf", d=64, heads=4, kv=2, ffn=96, seed=2)
  workdir = lora_run(str(tmp_path / "hf"), str(tmp_path / "run"), param_dtype="bfloat16")
  tokens = tokens_batch(PIECES + 1)
  expected = run_logits(workdir, tokens)[..., :PIECES + 1]

  assert convert.main(["orbax-to-hf", workdir, str(tmp_path / "fp32"), "--dtype=float32"]) == 0
  select.main([f"--workdir={workdir}", "--choose=1", f"--out={tmp_path / 'chosen_hf'}"])
  for out in ("fp32", "chosen_hf"):
    header = safetensors_io.read_header(str(tmp_path / out / "model.safetensors"))
    assert {v["dtype"] for k, v in header.items() if k != "__data_start__"} == {"F32"}, out
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / out)).eval()
    np.testing.assert_allclose(hf_logits(model, tokens), expected, atol=2e-5, rtol=0)

  select.main([f"--workdir={workdir}", "--choose=1", "--format=orbax",
               f"--out={tmp_path / 'orbax'}"])
  ours, params = our_logits(str(tmp_path / "orbax"), tokens)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  np.testing.assert_allclose(ours[..., :PIECES + 1], expected, atol=2e-5, rtol=0)

  assert convert.main(["orbax-to-hf", workdir, str(tmp_path / "bf16"), "--dtype=bfloat16"]) == 0
  header = safetensors_io.read_header(str(tmp_path / "bf16" / "model.safetensors"))
  assert {v["dtype"] for k, v in header.items() if k != "__data_start__"} == {"BF16"}


def test_merged_exports_equal_the_model_with_adapters(new_eot, tmp_path):
  """convert orbax-to-hf and select --choose (hf, orbax) of a LoRA run write W + scale A B:
  transformers on the HF export and our forward on the orbax export give the logits of our
  model with its adapters, and not the base's (without the merge they would: B is far from
  zero, checked in run_logits)."""
  base, workdir = new_eot
  tokens = tokens_batch(PIECES + 1)
  expected = run_logits(workdir, tokens)[..., :PIECES + 1]

  assert convert.main(["orbax-to-hf", workdir, str(tmp_path / "hf"), "--dtype=float32"]) == 0
  header = safetensors_io.read_header(str(tmp_path / "hf" / "model.safetensors"))
  assert not [k for k in header if "lora" in k]
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  np.testing.assert_allclose(hf_logits(model, tokens), expected, atol=1e-4, rtol=0)
  base_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  plain = tokens_batch(PIECES, seed=1)
  assert np.abs(hf_logits(model, plain)[..., :PIECES] - hf_logits(base_model, plain)).max() > 0.1

  out = str(tmp_path / "orbax")
  select.main([f"--workdir={workdir}", "--choose=1", "--format=orbax", f"--out={out}"])
  assert pretrained.OrbaxParams(out).lora_rank == 0  # a plain model, usable as init_from
  ours, _ = our_logits(out, tokens)
  np.testing.assert_allclose(ours[..., :PIECES + 1], expected, atol=1e-4, rtol=0)
  with open(os.path.join(workdir, "chosen.json"), encoding="utf-8") as f:
    assert json.load(f)["format"] == "orbax"


def peft_model(base: str, out: str, rows: int):
  model = transformers.AutoModelForCausalLM.from_pretrained(base)
  if rows != model.get_input_embeddings().weight.shape[0]:
    model.resize_token_embeddings(rows)  # the README's step for a new EOT row
  return peft.PeftModel.from_pretrained(model, out).eval()


def test_peft_adapters_with_a_new_eot_row_load_on_the_resized_base(new_eot, tmp_path):
  """select --format=peft: on the HF base resized to the run's vocabulary, PeftModel gives our
  logits with adapters, the new EOT's embedding and LM head rows included (the file carries
  them); AutoPeftModelForCausalLM finds the base and resizes it from the export alone. The
  PEFT model's logits move away from the base's: the adapters are not zero."""
  base, workdir = new_eot
  out = str(tmp_path / "peft")
  select.main([f"--workdir={workdir}", "--choose=1", "--format=peft", f"--out={out}"])
  with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == (
      "LORA", "CAUSAL_LM", 4, 8)
  assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"]
  assert cfg["base_model_name_or_path"] == os.path.abspath(base)
  header = safetensors_io.read_header(os.path.join(out, "adapter_model.safetensors"))
  assert header["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]["shape"] == [
      4, 64]
  assert header["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]["shape"] == [
      64, 4]
  assert header["base_model.model.lm_head.weight"]["shape"] == [PIECES + 1, 64]

  tokens = tokens_batch(PIECES + 1)
  expected = run_logits(workdir, tokens)[..., :PIECES + 1]
  model = peft_model(base, out, PIECES + 1)
  np.testing.assert_allclose(hf_logits(model, tokens), expected, atol=1e-4, rtol=0)
  auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(hf_logits(auto, tokens), expected, atol=1e-4, rtol=0)

  plain = tokens_batch(PIECES, seed=1)
  base_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  assert np.abs(hf_logits(model, plain)[..., :PIECES] - hf_logits(base_model, plain)).max() > 0.1


def test_peft_adapters_with_an_existing_eot_need_no_resize(tmp_path):
  """data.eot_token names a token of the base's vocabulary: convert orbax-to-hf --peft writes
  the adapters alone (no embedding rows) and PeftModel on the base as it is gives our logits."""
  make_hf(tmp_path / "hf", d=64, heads=4, kv=2, ffn=96, seed=1)
  base = str(tmp_path / "hf")
  workdir = lora_run(base, str(tmp_path / "run"), eot_token="</s>")
  out = str(tmp_path / "peft")
  assert convert.main(["orbax-to-hf", workdir, out, "--peft"]) == 0
  header = safetensors_io.read_header(os.path.join(out, "adapter_model.safetensors"))
  assert not [k for k in header if "lora" not in k and k != "__data_start__"]
  tokens = tokens_batch(PIECES)
  model = peft_model(base, out, PIECES)
  np.testing.assert_allclose(hf_logits(model, tokens), run_logits(workdir, tokens)[..., :PIECES],
                             atol=1e-4, rtol=0)
  base_model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  assert np.abs(hf_logits(model, tokens) - hf_logits(base_model, tokens)).max() > 0.1


def test_peft_export_of_a_full_fine_tune_is_refused(tmp_path, capsys):
  """--peft on params with no adapters: one line, exit 2, nothing written."""
  make_hf(tmp_path / "hf", d=64, heads=4, kv=2, ffn=96)
  assert convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
  capsys.readouterr()
  out = tmp_path / "peft"
  assert convert.main(["orbax-to-hf", str(tmp_path / "ours"), str(out), "--peft"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --peft: ") and err.count("\n") == 1, err
  assert "lora.rank=0" in err and not out.exists()
