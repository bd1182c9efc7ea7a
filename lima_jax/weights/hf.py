"""Hugging Face LLaMA directories: config.json + safetensors shards, read and written.

Reading checks everything the config promises before any weight moves: the architecture, that
every tensor is present, and each tensor's shape. Writing produces what
`transformers.AutoModelForCausalLM.from_pretrained` loads, with the tokenizer and EOT as an added
special token; generation stops on it and on the model's own end ids (`eos_token_id`: the
tokenizer's `stop_ids`, EOT first).
"""

import json
import os

import numpy as np

from lima_jax.data import ChatTokenizer, chat_format, tokenizer_files
from lima_jax.errors import LimaError
from lima_jax.weights import hf_tokenizer, layout, safetensors_io

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
EOT_TEXT = chat_format.EOT_TEXT  # the name of LIMA's new EOT token in exports
_ARCH = "LlamaForCausalLM"
_LAYER_NAMES = {
    "attn.wq": "self_attn.q_proj.weight", "attn.wk": "self_attn.k_proj.weight",
    "attn.wv": "self_attn.v_proj.weight", "attn.wo": "self_attn.o_proj.weight",
    "attn_norm.scale": "input_layernorm.weight", "mlp.gate": "mlp.gate_proj.weight",
    "mlp.up": "mlp.up_proj.weight", "mlp.down": "mlp.down_proj.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight",
                 "final_norm.scale": "model.norm.weight"}


def tensor_name(name: str, layer: int | None = None) -> str:
  if layer is None:
    return _GLOBAL_NAMES[name]
  return f"model.layers.{layer}.{_LAYER_NAMES[name]}"


def tensor_names(fields: dict):
  """(our name, layer or None, HF name) for every tensor of the model, layers grouped by name."""
  for name in layout.global_params(fields):
    yield name, None, tensor_name(name)
  for name in layout.LAYER_PARAMS:
    for layer in range(fields["n_layers"]):
      yield name, layer, tensor_name(name, layer)


def read_config(hf_dir: str) -> tuple[dict, dict]:
  """(model fields with the file's vocab_size, extras to carry to an export)."""
  if not os.path.isdir(hf_dir):
    raise LimaError(f"{hf_dir}: no such directory")
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.isfile(path):
    raise LimaError(f"{hf_dir}: no {CONFIG} (not a Hugging Face model directory)")
  try:
    with open(path, encoding="utf-8") as f:
      c = json.load(f)
  except (OSError, ValueError) as e:
    raise LimaError(f"{path}: unreadable JSON ({e})") from None
  archs = c.get("architectures")
  if (_ARCH not in archs) if archs else c.get("model_type") != "llama":
    raise LimaError(f"{path}: architecture {archs or c.get('model_type')} is not supported; "
                    f"only {_ARCH}")

  def need(key):
    if key not in c:
      raise LimaError(f"{path}: missing key '{key}'")
    return c[key]

  def refuse(key, ok, what):
    if not ok:
      raise LimaError(f"{path}: {key}={c.get(key)!r} is not supported ({what})")

  refuse("hidden_act", c.get("hidden_act", "silu") == "silu", "LLaMA uses silu")
  refuse("attention_bias", not c.get("attention_bias"), "LLaMA has no biases")
  refuse("mlp_bias", not c.get("mlp_bias"), "LLaMA has no biases")
  rope = c.get("rope_parameters") or {}
  fields = {
      "vocab_size": need("vocab_size"), "d_model": need("hidden_size"),
      "n_layers": need("num_hidden_layers"), "n_heads": need("num_attention_heads"),
      "n_kv_heads": c.get("num_key_value_heads") or need("num_attention_heads"),
      "ffn_dim": need("intermediate_size"),
      "rope_theta": float(c.get("rope_theta", rope.get("rope_theta", 10_000.0))),
      **_rope_scaling(c, path),
      "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
  }
  refuse("head_dim", c.get("head_dim") in (None, fields["d_model"] // fields["n_heads"]),
         "must be hidden_size / num_attention_heads")
  extras = {"max_position_embeddings": c.get("max_position_embeddings", 2048),
            "bos_token_id": c.get("bos_token_id", 1)}
  return fields, extras


# Our RoPE scaling fields by the key transformers gives them in rope_parameters / rope_scaling.
_ROPE_KEYS = {"factor": "factor", "low_freq_factor": "low_freq_factor",
              "high_freq_factor": "high_freq_factor",
              "original_max_position_embeddings": "original_max_position"}
_ROPE_NEEDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings")}


def _rope_scaling(c: dict, path: str) -> dict:
  """Our rope_scaling_* fields from config.json. transformers 5 writes `rope_parameters`, older
  releases `rope_scaling` (and 5 prefers it when both are there, as here); the type is under
  `rope_type` or, older still, `type`."""
  key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
  rope = c.get(key) or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in _ROPE_NEEDS:
    raise LimaError(f"{path}: {key}.rope_type={kind!r} is not supported (only default, linear "
                    "and llama3 RoPE)")
  # transformers falls back to max_position_embeddings for a missing original length.
  rope = dict({"original_max_position_embeddings": c.get("max_position_embeddings")}, **rope)
  values = {}
  for name in _ROPE_NEEDS[kind]:
    if rope.get(name) is None:
      raise LimaError(f"{path}: {key}.{name} is missing (needed by rope_type {kind!r})")
    number = int if name == "original_max_position_embeddings" else float
    values[_ROPE_KEYS[name]] = number(rope[name])
  return layout.rope_scaling(kind, **values)


def _rope_config(fields: dict) -> dict:
  """config.json's rope_parameters (transformers 5) for our fields; an older transformers reads
  the same under rope_scaling."""
  rope = {"rope_type": fields["rope_scaling_type"], "rope_theta": fields["rope_theta"]}
  for hf_key in _ROPE_NEEDS[fields["rope_scaling_type"]]:
    rope[hf_key] = fields[f"rope_scaling_{_ROPE_KEYS[hf_key]}"]
  return rope


def _weight_files(hf_dir: str) -> list[str]:
  index = os.path.join(hf_dir, INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
      raise LimaError(f"{index}: unreadable index ({e})") from None
    for name in files:
      if not os.path.isfile(os.path.join(hf_dir, name)):
        raise LimaError(f"{hf_dir}: shard {name} listed in {INDEX} is missing")
  else:
    files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
  if not files:
    raise LimaError(f"{hf_dir}: no *.safetensors weights (pytorch_model.bin is not supported)")
  return [os.path.join(hf_dir, n) for n in files]


class HfSource:
  """The tensors of an HF LLaMA directory as memory-mapped views in our layout."""

  def __init__(self, hf_dir: str):
    self.path = hf_dir
    self.fields, self.extras = read_config(hf_dir)
    self._files = safetensors_io.SafetensorsFiles(_weight_files(hf_dir))
    shapes = layout.linear_shapes(self.fields)
    for name, _, hf_name in tensor_names(self.fields):
      if hf_name not in self._files:
        raise LimaError(f"{hf_dir}: tensor {hf_name} is missing from the safetensors files")
      if self._files.shape(hf_name) != shapes[name]:
        raise LimaError(f"{hf_dir}: tensor {hf_name} has shape {self._files.shape(hf_name)}, "
                        f"but {CONFIG} implies {shapes[name]}")

  def tokenizer(self) -> str | None:
    """The directory, when it holds a tokenizer (tokenizer.json or tokenizer.model)."""
    has = any(os.path.isfile(os.path.join(self.path, n)) for n in tokenizer_files.MAIN_FILES)
    return self.path if has else None

  def tensor(self, name: str, layer: int | None = None) -> np.ndarray:
    return layout.from_linear(name, self._files.get(tensor_name(name, layer)), self.fields)


def write_dir(out_dir: str, fields: dict, fetch, *, tokenizer: ChatTokenizer,
              extras: dict, dtype, shard_bytes: int = 5 << 30) -> list[str]:
  """Writes an HF directory from our params; fetch(dotted param name) -> host array, called once
  per param. The tokenizer and its chat template reproduce training's ids in transformers
  (hf_tokenizer); generation stops on EOT and the model's own end ids (config.json's and
  generation_config.json's eos_token_id: `tokenizer.stop_ids`, EOT first; one id alone is
  written as a number). Returns the safetensors files written."""
  shapes = layout.linear_shapes(fields)
  vocab = fields["vocab_size"]
  entries, cached = [], {}

  def produce(name, layer):
    def get():
      full = ("blocks." + name) if layer is not None else name
      if full not in cached:
        cached.clear()  # one param on the host at a time
        cached[full] = fetch(full)
      x = cached[full] if layer is None else cached[full][layer]
      if name in layout.VOCAB_PARAMS:  # drop the padding rows past the real vocabulary
        x = x[:vocab] if name == "embed" else x[:, :vocab]
      return layout.to_linear(name, x)
    return get

  for name, layer, hf_name in tensor_names(fields):
    entries.append((hf_name, shapes[name], dtype, produce(name, layer)))

  # Group the tensors into shards of at most shard_bytes (a tensor never spans two files).
  groups, size = [[]], 0
  for entry in entries:
    nbytes = int(np.prod(entry[1])) * np.dtype(dtype).itemsize
    if groups[-1] and size + nbytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(entry)
    size += nbytes
  names = (["model.safetensors"] if len(groups) == 1 else
           [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
  os.makedirs(out_dir, exist_ok=True)
  weight_map, total = {}, 0
  for file_name, group in zip(names, groups):
    safetensors_io.write(os.path.join(out_dir, file_name), group)
    for hf_name, shape, _, _ in group:
      weight_map[hf_name] = file_name
      total += int(np.prod(shape)) * np.dtype(dtype).itemsize
  if len(groups) > 1:
    _write_json(os.path.join(out_dir, INDEX),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  _write_config(out_dir, fields, dict(extras, bos_token_id=tokenizer.bos_id), tokenizer.stop_ids,
                dtype)
  hf_tokenizer.write(out_dir, tokenizer)
  return [os.path.join(out_dir, n) for n in names]


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _write_config(out_dir, fields, extras, stop_ids, dtype) -> None:
  theta = fields["rope_theta"]
  bos = extras.get("bos_token_id", 1)
  eos = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
  _write_json(os.path.join(out_dir, CONFIG), {
      "architectures": [_ARCH], "model_type": "llama", "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False,
      "vocab_size": fields["vocab_size"], "hidden_size": fields["d_model"],
      "intermediate_size": fields["ffn_dim"], "num_hidden_layers": fields["n_layers"],
      "num_attention_heads": fields["n_heads"], "num_key_value_heads": fields["n_kv_heads"],
      "head_dim": fields["d_model"] // fields["n_heads"], "rms_norm_eps": fields["norm_eps"],
      # Both spellings: transformers 5 reads rope_parameters, older releases rope_theta and
      # rope_scaling (null when unscaled).
      "rope_theta": theta, "rope_parameters": _rope_config(fields),
      "rope_scaling": None if fields["rope_scaling_type"] == "default" else _rope_config(fields),
      "tie_word_embeddings": fields["tie_embeddings"],
      "max_position_embeddings": extras.get("max_position_embeddings", 2048),
      "bos_token_id": bos, "eos_token_id": eos,
      "torch_dtype": np.dtype(dtype).name, "dtype": np.dtype(dtype).name,
  })
  _write_json(os.path.join(out_dir, "generation_config.json"),
              {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": stop_ids[0]})
