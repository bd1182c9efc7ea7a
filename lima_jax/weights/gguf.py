"""GGUF files (llama.cpp's format): LLaMA-architecture weights and the tokenizer they carry.

The file is read by the `gguf` package's memory-mapped reader; each tensor is dequantised to
fp32 by `gguf.quants.dequantize` (F32, F16, BF16 and the quantised types it implements: Q4_0,
Q4_1, Q5_*, Q8_0, the K-quants, IQ*) only when asked for, so the host holds about one tensor at
a time. llama.cpp stores q and k with the rotary pairs interleaved (its converter permutes HF's
rotate-half rows); they are read back through `layout.from_interleaved`, as Meta's files are.

The tokenizer lives in the file's metadata (`tokenizer.ggml.*`); `write_tokenizer` rebuilds it
with the `tokenizers` library as an HF `tokenizer.json` + `tokenizer_config.json` (chat template,
special tokens, add_bos_token / add_eos_token) + `generation_config.json` (the end ids):
byte-level BPE (`gpt2`: SmolLM, LLaMA-3) or sentencepiece BPE (`llama`:
LLaMA-1/2), each split as llama.cpp splits it.
"""

import json
import os
import tempfile

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from lima_jax.errors import LimaError
from lima_jax.weights import layout

ARCH = "llama"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
_LAYER_NAMES = {
    "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
    "attn_norm.scale": "attn_norm", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up",
    "mlp.down": "ffn_down", "mlp_norm.scale": "ffn_norm",
}
_GLOBAL_NAMES = {"embed": "token_embd.weight", "lm_head": "output.weight",
                 "final_norm.scale": "output_norm.weight"}
# llama.cpp's byte-level pre-tokenizers (src/llama-vocab.cpp, `llama_vocab::impl::load` and
# `llm_tokenizer_bpe`), by `tokenizer.ggml.pre`: (how text is split, ignore_merges: a pre-token
# that is a whole token of the vocabulary is kept whole, add_bos's default). The splits:
#   gpt2    the GPT-2 regex, as `pre_tokenizers.ByteLevel(use_regex=True)` applies it
#   digits  each digit on its own (\p{N}), then the GPT-2 regex
#   llama3  LLaMA-3's regex (its tokenizer.json's Split, and Meta's tiktoken pattern)
# Only these are reproduced; others (llama.cpp's 'default' among them) are refused by name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    **{name: ("llama3", True, True) for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
        "jina-v5-nano")},
    **{name: ("llama3", False, False) for name in ("smaug-bpe", "dbrx")},
    **{name: ("gpt2", False, False) for name in (
        "gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de",
        "gigachat", "a.x-4.0", "mellum", "modern-bert", "exaone4", "jais", "trillion",
        "granite-docling")},
    **{name: ("digits", False, False) for name in (
        "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
        "mellum2")},
}
# Tokens llama.cpp ends a generation at by their text, whatever the ids the file names
# (llama-vocab.cpp, `special_eog_ids`; the chat ends of the families a LLaMA-architecture file
# may carry).
_END_TEXTS = frozenset(("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>",
                        "<|endoftext|>", "<end_of_turn>", "<EOT>", "_<EOT>",
                        "<end_of_utterance>", "<｜end▁of▁sentence｜>"))
_CONTROL, _USER_DEFINED, _UNKNOWN = (int(gguf.TokenType.CONTROL),
                                     int(gguf.TokenType.USER_DEFINED),
                                     int(gguf.TokenType.UNKNOWN))


def tensor_name(name: str, layer: int | None = None) -> str:
  if layer is None:
    return _GLOBAL_NAMES[name]
  return f"blk.{layer}.{_LAYER_NAMES[name]}.weight"


def _f32(x) -> float:
  """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
  9.999999747378752e-06)."""
  return float(str(np.float32(x)))


def _open(path: str) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise LimaError(f"{path}: no such file")
  try:
    return gguf.GGUFReader(path, "r")
  except (ValueError, OSError, KeyError, IndexError) as e:  # the reader's ways of saying "not GGUF"
    raise LimaError(f"{path}: not a readable GGUF file ({' '.join(str(e).split())})") from None


class GgufSource:
  """The tensors of a LLaMA-architecture GGUF file, dequantised one at a time, in our layout.

  Raises LimaError for another `general.architecture` (naming it), mixture-of-experts or scaled
  RoPE, biases or unknown tensors, and any tensor whose shape the metadata does not imply.
  """

  def __init__(self, path: str):
    self.path = path
    self._reader = _open(path)
    arch = self.value("general.architecture")
    if arch != ARCH:
      raise LimaError(f"{path}: general.architecture is {arch!r}; only {ARCH!r} (LLaMA) files "
                      "are supported")
    self._tensors = {t.name: t for t in self._reader.tensors}
    self.fields = self._read_fields()
    self.extras = {"max_position_embeddings": int(self.value(f"{ARCH}.context_length", 2048)),
                   "bos_token_id": int(self.value("tokenizer.ggml.bos_token_id", 1))}
    self._check_tensors()
    self._cache = {}
    self._tokenizer_dir = None

  def value(self, key: str, default=None):
    """A metadata value (str, number, bool or list), or `default` when the file lacks it."""
    field = self._reader.get_field(key)
    return default if field is None else field.contents()

  def _need(self, key: str):
    value = self.value(key)
    if value is None:
      raise LimaError(f"{self.path}: metadata key {key} is missing")
    return value

  def _refuse(self, key: str, ok: bool, what: str) -> None:
    if not ok:
      raise LimaError(f"{self.path}: {key}={self.value(key)!r} is not supported ({what})")

  def _read_fields(self) -> dict:
    a = ARCH
    self._refuse(f"{a}.expert_count", not self.value(f"{a}.expert_count"),
                 "mixture-of-experts; only dense LLaMA")
    self._refuse(f"{a}.rope.scaling.type", self.value(f"{a}.rope.scaling.type", "none") == "none",
                 "only unscaled rotary embeddings")
    if "rope_freqs.weight" in self._tensors:  # LLaMA-3.1's frequency scaling, as a tensor
      raise LimaError(f"{self.path}: tensor rope_freqs.weight (scaled rotary embeddings) is not "
                      "supported; only unscaled rotary embeddings")
    embed = self._tensors.get(_GLOBAL_NAMES["embed"])
    if embed is None:
      raise LimaError(f"{self.path}: tensor {_GLOBAL_NAMES['embed']} is missing")
    d_model = int(self._need(f"{a}.embedding_length"))
    n_heads = int(self._need(f"{a}.attention.head_count"))
    head_dim = d_model // n_heads
    for key in (f"{a}.rope.dimension_count", f"{a}.attention.key_length",
                f"{a}.attention.value_length"):
      self._refuse(key, self.value(key, head_dim) == head_dim,
                   f"must be embedding_length / head_count = {head_dim}")
    return {
        "vocab_size": int(self.value(f"{a}.vocab_size", int(embed.shape[1]))),
        "d_model": d_model, "n_layers": int(self._need(f"{a}.block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(self.value(f"{a}.attention.head_count_kv", n_heads)),
        "ffn_dim": int(self._need(f"{a}.feed_forward_length")),
        "rope_theta": _f32(self.value(f"{a}.rope.freq_base", 10_000.0)),
        **layout.rope_scaling(),  # scaled RoPE is refused above
        "norm_eps": _f32(self._need(f"{a}.attention.layer_norm_rms_epsilon")),
        "tie_embeddings": _GLOBAL_NAMES["lm_head"] not in self._tensors,
    }

  def _check_tensors(self) -> None:
    shapes = layout.linear_shapes(self.fields)
    wanted = {tensor_name(n): n for n in layout.global_params(self.fields)}
    wanted.update({tensor_name(n, i): n for n in layout.LAYER_PARAMS
                   for i in range(self.fields["n_layers"])})
    for gguf_name, name in wanted.items():
      t = self._tensors.get(gguf_name)
      if t is None:
        raise LimaError(f"{self.path}: tensor {gguf_name} is missing")
      shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
      if shape != shapes[name]:
        raise LimaError(f"{self.path}: tensor {gguf_name} has shape {shape}, but the metadata "
                        f"implies {shapes[name]}")
    extra = sorted(set(self._tensors) - set(wanted))
    if extra:
      raise LimaError(f"{self.path}: tensor {extra[0]} is not part of a LLaMA model "
                      f"({len(extra)} such tensor(s); biases and extra layers are not supported)")

  def tokenizer(self) -> str:
    """A directory holding the tokenizer rebuilt from the metadata (`write_tokenizer`), made on
    first use and removed with this source."""
    if self._tokenizer_dir is None:
      self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="lima_jax_gguf_")
      self.write_tokenizer(self._tokenizer_dir.name)
    return self._tokenizer_dir.name

  def eos_token(self) -> str:
    """The text of the file's end token (tokenizer.ggml.eos_token_id): a chat model's end of
    turn, such as SmolLM2's `<|im_end|>`."""
    eos = self.value("tokenizer.ggml.eos_token_id")
    tokens = self._reader.get_field("tokenizer.ggml.tokens")
    if eos is None or tokens is None or not 0 <= eos < len(tokens.data):
      raise LimaError(f"{self.path}: no end token (tokenizer.ggml.eos_token_id); pass "
                      "--eot-token")
    return tokens.contents(eos)

  def end_ids(self) -> list[int]:
    """The ids llama.cpp ends a generation at: tokenizer.ggml.eos_token_id, eot_token_id and
    eom_token_id (those set and inside the vocabulary), then the tokens it recognises as ends
    by their text (`_END_TEXTS`), in id order."""
    tokens = self.value("tokenizer.ggml.tokens") or []
    ids = [self.value(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    ids += [i for i, t in enumerate(tokens) if t in _END_TEXTS]
    return list(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= int(i) < len(tokens)))

  def write_tokenizer(self, out_dir: str) -> str:
    """Writes tokenizer.json, tokenizer_config.json and generation_config.json (the end ids)
    into out_dir; returns tokenizer.json's path. Raises LimaError for a tokenizer type or
    pre-tokenizer this module does not know."""
    tokenizer, config = build_tokenizer(self)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, TOKENIZER_JSON)
    tokenizer.save(path)
    for name, content in ((TOKENIZER_CONFIG, config),
                          (GENERATION_CONFIG, {"eos_token_id": self.end_ids()})):
      with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return path

  def linear(self, name: str, layer: int | None = None) -> np.ndarray:
    """One tensor dequantised to fp32 in the torch Linear layout ([out, in]), q/k as stored
    (rotary pairs interleaved). F32 tensors are views of the memory map."""
    key = tensor_name(name, layer)
    if key not in self._cache:
      t = self._tensors[key]
      try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
      except NotImplementedError:
        raise LimaError(f"{self.path}: tensor {key} is of type {t.tensor_type.name}, which the "
                        "gguf package cannot dequantise") from None
      # Every device shard is cut from the same tensor: keep the last one dequantised.
      self._cache = {key: w.reshape(layout.linear_shapes(self.fields)[name])}
    return self._cache[key]

  def tensor(self, name: str, layer: int | None = None) -> np.ndarray:
    return layout.from_rotary_interleaved_linear(name, self.linear(name, layer), self.fields)


def build_tokenizer(source: GgufSource) -> tuple[Tokenizer, dict]:
  """(the tokenizers.Tokenizer, tokenizer_config.json's dict) the file's metadata describes."""
  kind = source.value("tokenizer.ggml.model")
  tokens = source.value("tokenizer.ggml.tokens")
  if kind is None or tokens is None:
    raise LimaError(f"{source.path}: no tokenizer in the metadata (tokenizer.ggml.model, "
                    "tokenizer.ggml.tokens)")
  types = source.value("tokenizer.ggml.token_type") or [1] * len(tokens)
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise LimaError(f"{source.path}: tokenizer.ggml.tokens repeats a token")
  if len(tokens) != source.fields["vocab_size"]:
    raise LimaError(f"{source.path}: the tokenizer has {len(tokens)} tokens, but the weights a "
                    f"vocabulary of {source.fields['vocab_size']}")
  special_ids = special_token_ids(source, kind, len(tokens))
  if kind == "gpt2":
    tokenizer = _byte_level(source, vocab)
  elif kind == "llama":
    tokenizer = _sentencepiece(source, tokens, vocab, special_ids["unk_token"])
  else:
    raise LimaError(f"{source.path}: tokenizer.ggml.model={kind!r} is not supported (only "
                    "'gpt2', byte-level BPE, and 'llama', sentencepiece BPE)")
  special = [i for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
  tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in special])
  user = [i for i, t in enumerate(types) if t == _USER_DEFINED]
  tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

  add_bos, add_eos = _adds_bos_eos(source, kind, special_ids)
  steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
  if add_bos or add_eos:  # what llama.cpp puts around a text it tokenizes with add_special
    bos, eos = (tokens[special_ids[k]] if add else "" for k, add in (("bos_token", add_bos),
                                                                      ("eos_token", add_eos)))
    single = " ".join(t for t in (bos, "$A", eos) if t)
    pair = " ".join(t for t in (bos, "$A", eos, bos, "$B:1", eos) if t)
    steps.append(processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=sorted({(tokens[special_ids[k]], special_ids[k])
                               for k, add in (("bos_token", add_bos), ("eos_token", add_eos))
                               if add})))
  if steps:
    tokenizer.post_processor = processors.Sequence(steps)

  config = {name: tokens[i] for name, i in special_ids.items() if i is not None}
  config.update(
      tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos, add_eos_token=add_eos,
      model_max_length=source.extras["max_position_embeddings"], clean_up_tokenization_spaces=False,
      added_tokens_decoder={str(i): {"content": tokens[i], "special": types[i] != _USER_DEFINED,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "single_word": False} for i in special + user})
  template = source.value("tokenizer.chat_template")
  if template:
    config["chat_template"] = template
  return tokenizer, config


def special_token_ids(source: GgufSource, kind: str, count: int) -> dict:
  """{bos_token, eos_token, unk_token, pad_token: id or None} from tokenizer.ggml.*_token_id;
  a sentencepiece vocabulary falls back to LLaMA's 1, 2 and 0 as llama.cpp does; an id past
  the vocabulary is none, as llama.cpp ignores it."""
  defaults = {"bos": 1, "eos": 2, "unknown": 0} if kind == "llama" else {}
  ids = {}
  for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                    ("pad_token", "padding")):
    value = source.value(f"tokenizer.ggml.{key}_token_id", defaults.get(key))
    ids[name] = int(value) if value is not None and 0 <= int(value) < count else None
  return ids


def _adds_bos_eos(source: GgufSource, kind: str, special_ids: dict) -> tuple[bool, bool]:
  """(add_bos, add_eos) as llama.cpp reads them: tokenizer.ggml.add_bos_token /
  add_eos_token, else its defaults (BOS on for sentencepiece and the LLaMA-3 pre-tokenizers,
  EOS off). Raises LimaError for a flag whose token id is not set, as llama.cpp refuses it."""
  pre = source.value("tokenizer.ggml.pre", "")
  default_bos = kind == "llama" or PRE_TOKENIZERS.get(pre, ("", False, False))[2]
  adds = []
  for key, name, default in (("bos", "bos_token", default_bos), ("eos", "eos_token", False)):
    add = bool(source.value(f"tokenizer.ggml.add_{key}_token", default))
    if add and special_ids[name] is None:
      raise LimaError(f"{source.path}: tokenizer.ggml.add_{key}_token is true, but "
                      f"tokenizer.ggml.{key}_token_id is not set")
    adds.append(add)
  return adds[0], adds[1]


def _byte_level(source: GgufSource, vocab: dict) -> Tokenizer:
  merges = source.value("tokenizer.ggml.merges")
  if not merges:
    raise LimaError(f"{source.path}: a byte-level BPE tokenizer needs tokenizer.ggml.merges")
  pre = source.value("tokenizer.ggml.pre")
  if pre is None:
    raise LimaError(f"{source.path}: tokenizer.ggml.pre is missing (llama.cpp then splits text "
                    "by its 'default' rules and warns that generation quality degrades); "
                    "convert the model again with a current llama.cpp")
  if pre not in PRE_TOKENIZERS:
    raise LimaError(f"{source.path}: tokenizer.ggml.pre={pre!r} is not supported (known: "
                    f"{', '.join(sorted(PRE_TOKENIZERS))})")
  split, ignore_merges, _ = PRE_TOKENIZERS[pre]
  # ignore_merges: a pre-token that is a whole token is kept whole even where no merge reaches
  # it (" Việt" in LLaMA-3's vocabulary), as llama.cpp, Meta's tokenizer.json and tiktoken do.
  tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges],
                                   ignore_merges=ignore_merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if split == "gpt2":
    tokenizer.pre_tokenizer = byte_level
  elif split == "digits":
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def _sentencepiece(source: GgufSource, tokens: list, vocab: dict, unk_id) -> Tokenizer:
  """Sentencepiece BPE as `tokenizers` runs it: merges ranked by the merged piece's score."""
  scores = source.value("tokenizer.ggml.scores")
  if scores is None:
    raise LimaError(f"{source.path}: a sentencepiece tokenizer needs tokenizer.ggml.scores")
  merges = []
  for piece, score in zip(tokens, scores):
    merges += [(score, vocab[piece[:i]], vocab[piece[i:]], piece[:i], piece[i:])
               for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
  merges.sort(key=lambda m: (-m[0], m[1], m[2]))
  unk = tokens[unk_id] if unk_id is not None else None
  tokenizer = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
  steps = [normalizers.Replace(" ", "\u2581")]
  if source.value("tokenizer.ggml.add_space_prefix", True):
    steps.insert(0, normalizers.Prepend("\u2581"))
  tokenizer.normalizer = normalizers.Sequence(steps)
  tokenizer.decoder = decoders.Sequence([
      decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
      decoders.Strip(" ", 1, 0)])
  return tokenizer
