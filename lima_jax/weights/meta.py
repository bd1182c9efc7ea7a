"""Meta's original LLaMA release: params.json + consolidated.NN.pth (+ tokenizer.model).

The .pth files are opened with `weights_only=True` (no pickled code runs) and memory-mapped.
Model-parallel releases (several consolidated files) are joined per tensor when it is read.
Meta's q/k rows interleave the rotary pairs; they are reordered to rotate-half on import.
torch is imported here only: training never needs it.
"""

import glob
import json
import os

import ml_dtypes
import numpy as np

from lima_jax.errors import LimaError
from lima_jax.weights import layout

PARAMS = "params.json"
_LAYER_NAMES = {
    "attn.wq": "attention.wq.weight", "attn.wk": "attention.wk.weight",
    "attn.wv": "attention.wv.weight", "attn.wo": "attention.wo.weight",
    "attn_norm.scale": "attention_norm.weight", "mlp.gate": "feed_forward.w1.weight",
    "mlp.up": "feed_forward.w3.weight", "mlp.down": "feed_forward.w2.weight",
    "mlp_norm.scale": "ffn_norm.weight",
}
_GLOBAL_NAMES = {"embed": "tok_embeddings.weight", "lm_head": "output.weight",
                 "final_norm.scale": "norm.weight"}
# params.json says only `use_scaled_rope`; the values are fixed in Meta's LLaMA-3.1 reference
# model (`apply_scaling`: scale factor 8, low 1, high 4, old context 8192). Meta's LLaMA-3.2 1B/3B
# files use factor 32 under the same flag: import those from their HF release.
META_SCALED_ROPE = layout.rope_scaling("llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position=8192)
# Axis along which model-parallel shards split each tensor (None: replicated in every shard).
_SPLIT_AXIS = {"attn.wq": 0, "attn.wk": 0, "attn.wv": 0, "attn.wo": 1, "mlp.gate": 0,
               "mlp.up": 0, "mlp.down": 1, "lm_head": 0, "embed": None, "attn_norm.scale": None,
               "mlp_norm.scale": None, "final_norm.scale": None}


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise LimaError("reading Meta .pth checkpoints needs torch: "
                    "pip install 'lima_jax[convert]'") from None
  return torch


def _numpy(tensor) -> np.ndarray:
  """A zero-copy numpy view of a CPU tensor; bfloat16 goes through its bits."""
  torch = _torch()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _tensor_name(name: str, layer: int | None) -> str:
  return _GLOBAL_NAMES[name] if layer is None else f"layers.{layer}.{_LAYER_NAMES[name]}"


class MetaSource:
  """The tensors of a Meta LLaMA directory as views in our layout."""

  def __init__(self, meta_dir: str):
    self.path = meta_dir
    if not os.path.isdir(meta_dir):
      raise LimaError(f"{meta_dir}: no such directory")
    params_path = os.path.join(meta_dir, PARAMS)
    if not os.path.isfile(params_path):
      raise LimaError(f"{meta_dir}: no {PARAMS} (not a Meta LLaMA directory)")
    try:
      with open(params_path, encoding="utf-8") as f:
        p = json.load(f)
    except (OSError, ValueError) as e:
      raise LimaError(f"{params_path}: unreadable JSON ({e})") from None
    files = sorted(glob.glob(os.path.join(meta_dir, "consolidated.*.pth")))
    if not files:
      raise LimaError(f"{meta_dir}: no consolidated.*.pth weight files")
    torch = _torch()
    self._shards = []
    for path in files:
      try:
        self._shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
      except Exception as e:  # torch raises many types for a bad file
        raise LimaError(f"{path}: cannot read as a weights-only torch checkpoint "
                        f"({' '.join(str(e).split())[:200]})") from None
    first = self._shards[0]
    for key in ("dim", "n_layers", "n_heads"):
      if key not in p:
        raise LimaError(f"{params_path}: missing key '{key}'")
    self._model_dim = p["dim"]
    for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
      if key not in first:
        raise LimaError(f"{files[0]}: tensor {key} is missing")
    # vocab_size is -1 in LLaMA-1's params.json and the FFN width is a formula of several keys:
    # both are read off the tensors instead.
    self.fields = {
        "vocab_size": self._joined_shape("embed", None)[0], "d_model": p["dim"],
        "n_layers": p["n_layers"], "n_heads": p["n_heads"],
        "n_kv_heads": p.get("n_kv_heads") or p["n_heads"],
        "ffn_dim": self._joined_shape("mlp.gate", 0)[0],
        "rope_theta": float(p.get("rope_theta", 10_000.0)),
        **(META_SCALED_ROPE if p.get("use_scaled_rope") else layout.rope_scaling()),
        "norm_eps": float(p.get("norm_eps", 1e-5)),
        "tie_embeddings": "output.weight" not in first,
    }
    self.extras = {"max_position_embeddings": p.get("max_seq_len", 2048), "bos_token_id": 1}
    self._check_shapes(files[0])
    self._cache = {}

  def _parts(self, name, layer):
    key = _tensor_name(name, layer)
    parts = []
    for shard in self._shards:
      if key not in shard:
        raise LimaError(f"{self.path}: tensor {key} is missing")
      parts.append(_numpy(shard[key]))
    return parts

  def _axis(self, name, parts) -> int | None:
    axis = _SPLIT_AXIS[name]
    if len(parts) == 1:
      return None
    if name == "embed":  # LLaMA-1/2 split the embedding by columns, LLaMA-3 by rows
      axis = 1 if sum(p.shape[1] for p in parts) == self._model_dim else 0
    return axis

  def _joined_shape(self, name, layer) -> tuple:
    parts = self._parts(name, layer)
    axis = self._axis(name, parts)
    if axis is None:
      return parts[0].shape
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return tuple(shape)

  def _check_shapes(self, where):
    shapes = layout.linear_shapes(self.fields)
    names = [(n, None) for n in layout.global_params(self.fields)]
    names += [(n, layer) for n in layout.LAYER_PARAMS for layer in range(self.fields["n_layers"])]
    for name, layer in names:
      got = self._joined_shape(name, layer)
      if got != shapes[name]:
        raise LimaError(f"{where}: tensor {_tensor_name(name, layer)} has shape {got}, but "
                        f"{PARAMS} implies {shapes[name]}")

  def tokenizer(self) -> str | None:
    path = os.path.join(self.path, "tokenizer.model")
    return path if os.path.isfile(path) else None

  def tensor(self, name: str, layer: int | None = None) -> np.ndarray:
    key = (name, layer)
    if key not in self._cache:
      parts = self._parts(name, layer)
      axis = self._axis(name, parts)
      # Joining copies; keep the last joined tensor, as every device's shard is cut from it.
      w = parts[0] if axis is None else np.concatenate(parts, axis=axis)
      self._cache = {key: w}
    return layout.from_rotary_interleaved_linear(name, self._cache[key], self.fields)
