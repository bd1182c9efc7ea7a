"""Our param tree, tensor by tensor, and its placement onto the mesh straight from a source.

A source (`hf.HfSource`, `meta.MetaSource`) hands out each tensor as a numpy view in our layout,
one layer at a time (wq as [d, heads, head_dim], ...), normally a view of a memory-mapped file.
`place` builds every param device shard by device shard, each cut from those views, so the host
holds about one shard at a time and never the model.

Names are our param paths joined with dots; per-layer tensors drop the leading 'blocks'.
"""

import dataclasses

import jax
import numpy as np

from lima_jax.model import LlamaConfig

LAYER_PARAMS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "attn_norm.scale",
                "mlp.gate", "mlp.up", "mlp.down", "mlp_norm.scale")
VOCAB_PARAMS = ("embed", "lm_head")  # [vocab, d] and [d, vocab]
ROPE_SCALING_KEYS = ("rope_scaling_type", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                     "rope_scaling_high_freq_factor", "rope_scaling_original_max_position")
# What a model is, as weights and their metadata describe it (LlamaConfig's other fields say how
# it is computed).
MODEL_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
              "rope_theta", *ROPE_SCALING_KEYS, "norm_eps", "tie_embeddings")
# An unscaled RoPE in those fields (LlamaConfig's defaults); metadata older than the scaling
# fields means this.
UNSCALED_ROPE = {f.name: f.default for f in dataclasses.fields(LlamaConfig)
                 if f.name in ROPE_SCALING_KEYS}


def rope_scaling(kind: str = "default", **values) -> dict:
  """The ROPE_SCALING_KEYS fields of a `kind` scaling; `values` by their suffix (factor=8, ...)."""
  return dict(UNSCALED_ROPE, rope_scaling_type=kind,
              **{f"rope_scaling_{k}": v for k, v in values.items()})


def model_fields(saved: dict) -> dict | None:
  """MODEL_KEYS from saved model metadata (None if a shape key is missing)."""
  if not isinstance(saved, dict) or any(k not in saved for k in MODEL_KEYS
                                        if k not in ROPE_SCALING_KEYS):
    return None
  return {k: saved.get(k, UNSCALED_ROPE.get(k)) for k in MODEL_KEYS}


def global_params(fields: dict) -> tuple:
  names = ("embed", "final_norm.scale")
  return names if fields["tie_embeddings"] else names + ("lm_head",)


def linear_shapes(fields: dict) -> dict:
  """Each tensor's shape in the torch Linear layout ([out, in]) that HF and Meta files share."""
  d, f, v = fields["d_model"], fields["ffn_dim"], fields["vocab_size"]
  hd = d // fields["n_heads"]
  q, kv = fields["n_heads"] * hd, fields["n_kv_heads"] * hd
  return {"attn.wq": (q, d), "attn.wk": (kv, d), "attn.wv": (kv, d), "attn.wo": (d, q),
          "attn_norm.scale": (d,), "mlp.gate": (f, d), "mlp.up": (f, d), "mlp.down": (d, f),
          "mlp_norm.scale": (d,), "embed": (v, d), "lm_head": (v, d), "final_norm.scale": (d,)}


def from_linear(name: str, w: np.ndarray, fields: dict) -> np.ndarray:
  """A torch Linear layout tensor as a view in our layout (no copy)."""
  hd = fields["d_model"] // fields["n_heads"]
  if name == "attn.wq":
    return w.reshape(fields["n_heads"], hd, -1).transpose(2, 0, 1)
  if name in ("attn.wk", "attn.wv"):
    return w.reshape(fields["n_kv_heads"], hd, -1).transpose(2, 0, 1)
  if name == "attn.wo":
    return w.reshape(-1, fields["n_heads"], hd).transpose(1, 2, 0)
  if name in ("mlp.gate", "mlp.up", "mlp.down", "lm_head"):
    return w.T
  return w


def to_linear(name: str, x: np.ndarray) -> np.ndarray:
  """The inverse of `from_linear` (vocabulary tensors must already be cut to the real rows)."""
  if name in ("attn.wq", "attn.wk", "attn.wv"):
    return x.reshape(x.shape[0], -1).T
  if name == "attn.wo":
    return x.reshape(-1, x.shape[-1]).T
  if name in ("mlp.gate", "mlp.up", "mlp.down", "lm_head"):
    return x.T
  return x


def from_interleaved(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """Meta's q/k [heads * head_dim, d], rotary pairs interleaved, as a [d, heads, 2, head_dim/2]
  view: flattening the last two axes gives the rotate-half order our RoPE uses."""
  return w.reshape(heads, head_dim // 2, 2, -1).transpose(3, 0, 2, 1)


def from_rotary_interleaved_linear(name: str, w: np.ndarray, fields: dict) -> np.ndarray:
  """`from_linear` for a checkpoint whose q/k rows interleave the rotary pairs (Meta's .pth,
  llama.cpp's GGUF): those two become rotate-half views, the rest is `from_linear`."""
  hd = fields["d_model"] // fields["n_heads"]
  if name == "attn.wq":
    return from_interleaved(w, fields["n_heads"], hd)
  if name == "attn.wk":
    return from_interleaved(w, fields["n_kv_heads"], hd)
  return from_linear(name, w, fields)


def _cut(view: np.ndarray, index: tuple) -> np.ndarray:
  """view[index]; a view with the head dim still split (Meta q/k) is merged after cutting, so only
  the shard is copied. The head dim is never sharded, so its index is always whole."""
  if view.ndim > len(index):
    part = view[index[:-1]]
    return part.reshape(part.shape[:len(index) - 1] + (-1,))
  return view[index]


def row_mean(rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
  """Mean over axis 0 in float64, a chunk at a time (the table may be a memory map)."""
  total = np.zeros(rows.shape[1:], np.float64)
  for start in range(0, rows.shape[0], chunk):
    total += rows[start:start + chunk].astype(np.float64).sum(axis=0)
  return total / rows.shape[0]


def _shard_shape(shape: tuple, index: tuple) -> tuple:
  return tuple(len(range(n)[i]) for n, i in zip(shape, index))


def _vocab_shard(rows, eot_row, shape, index, dtype) -> np.ndarray:
  """A shard of a vocabulary table with vocabulary on axis 0: the source rows, then the EOT row
  (if added), then zero padding up to the padded vocabulary."""
  out = np.zeros(_shard_shape(shape, index), dtype)
  wanted = range(shape[0])[index[0]]
  have = min(wanted.stop, rows.shape[0])
  if wanted.start < have:
    out[:have - wanted.start] = rows[wanted.start:have, index[1]]
  if eot_row is not None and wanted.start <= rows.shape[0] < wanted.stop:
    out[rows.shape[0] - wanted.start] = eot_row[index[1]]
  return out


def place(source, abstract_params, add_eot: bool):
  """The params dict on the mesh (shardings and dtypes from `abstract_params`), read from
  `source.tensor(name, layer)`. With add_eot the row after the source vocabulary is the mean of
  the source rows, in both the embedding and the LM head."""

  def leaf(path, target):
    keys = [k.key for k in path]
    dtype = target.dtype
    if keys[0] == "blocks":
      name = ".".join(keys[1:])

      def shard(index):
        out = np.empty(_shard_shape(target.shape, index), dtype)
        for i, layer in enumerate(range(target.shape[0])[index[0]]):
          out[i] = _cut(source.tensor(name, layer), index[1:])
        return out
    elif keys[0] in VOCAB_PARAMS:
      table = source.tensor(keys[0])
      # The vocabulary axis goes first so one routine serves [V, d] and [d, V].
      flip = keys[0] == "lm_head"
      rows = table.T if flip else table
      eot_row = row_mean(rows) if add_eot else None
      shape = target.shape[::-1] if flip else target.shape

      def shard(index):
        if flip:
          return _vocab_shard(rows, eot_row, shape, index[::-1], dtype).T
        return _vocab_shard(rows, eot_row, shape, index, dtype)
    else:
      name = ".".join(keys)

      def shard(index):
        return np.asarray(_cut(source.tensor(name), index), dtype)

    return _from_shards(target, shard)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params)


def _from_shards(target, shard):
  """Like `jax.make_array_from_callback`, but each host shard is moved to its device before the
  next is cut, so only one is alive at a time (a stacked param is many tensors' worth)."""
  indices = target.sharding.addressable_devices_indices_map(target.shape)
  arrays = [jax.device_put(shard(index), device) for device, index in indices.items()]
  return jax.make_array_from_single_device_arrays(target.shape, target.sharding, arrays)
