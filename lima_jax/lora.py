"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the frozen projections.

A targeted projection W computes x W + (alpha / rank) * dropout(x) A B, A [in, rank] and
B [rank, out], with B starting at zero so the first step's model is the base model exactly
(Hu et al. section 4.1). A and B train, and the base weights, embedding and norms stay frozen
but for the rows of tokens the run adds (`lima_jax.trained`, which says what trains).
A starts uniform in +-1/sqrt(in), the Kaiming-uniform (a = sqrt(5)) of PEFT's `LoraLayer`, so
our adapters start where PEFT's do. The matmuls are flax's `nnx.LoRA`.

The adapters live in the param tree beside the weight they adapt, as
`blocks.<attn|mlp>.lora_<target>.{lora_a, lora_b}` (stacked over layers like every block
param); `adapters` / `frozen` / `join` split and rebuild the pure-dict tree, `merged` folds them
into the base weights (an HF export, or our own params dir).
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from lima_jax.errors import LimaError


@dataclasses.dataclass(frozen=True)
class Target:
  module: str  # the block's sub-module: attn or mlp
  weight: str  # the base weight it adapts, in our layout
  hf_name: str  # the torch Linear in HF LLaMA's decoder layer (PEFT's target_modules)
  inputs: tuple  # dims of our weight's layout the projection contracts (logical names)
  outputs: tuple  # dims it produces


# q, k, v, o, gate, up, down: every projection of LLaMA's block (QLoRA's "all linear layers").
TARGETS = {
    "q": Target("attn", "wq", "self_attn.q_proj", ("embed",), ("heads", "head_dim")),
    "k": Target("attn", "wk", "self_attn.k_proj", ("embed",), ("kv_heads", "head_dim")),
    "v": Target("attn", "wv", "self_attn.v_proj", ("embed",), ("kv_heads", "head_dim")),
    "o": Target("attn", "wo", "self_attn.o_proj", ("heads", "head_dim"), ("embed",)),
    "gate": Target("mlp", "gate", "mlp.gate_proj", ("embed",), ("mlp",)),
    "up": Target("mlp", "up", "mlp.up_proj", ("embed",), ("mlp",)),
    "down": Target("mlp", "down", "mlp.down_proj", ("mlp",), ("embed",)),
}
PREFIX = "lora_"  # the adapter sub-module of target t is `lora_<t>`


def parse_targets(text: str, key: str = "lora.targets") -> tuple[str, ...]:
  """'q,v' -> ('q', 'v') in TARGETS order; raises LimaError naming `key` for unknown names."""
  names = [n.strip() for n in str(text).split(",") if n.strip()]
  unknown = [n for n in names if n not in TARGETS]
  if unknown or not names:
    raise LimaError(f"config {key}: {', '.join(map(repr, unknown)) or 'nothing'} given; list "
                    f"some of {', '.join(TARGETS)} separated by commas")
  return tuple(n for n in TARGETS if n in names)


# LlamaConfig's LoRA fields, each the config key `lora.<suffix>`.
FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")
BASE = "lora_base"  # checkpoint metadata: where the frozen base comes from (`base_record`)


def fields(section) -> dict:
  """The LlamaConfig fields of a config's `lora` section."""
  return {"lora_rank": int(section.rank), "lora_alpha": float(section.alpha),
          "lora_targets": parse_targets(section.targets), "lora_dropout": float(section.dropout)}


def base_record(cfg) -> dict:
  """Where a LoRA run's frozen base comes from, for its checkpoint metadata: init_from (made
  absolute, so a later command run elsewhere finds it) or, without one, the seed's random init."""
  path = cfg.init_from
  if path and "://" not in path:
    path = os.path.abspath(path)
  return {"init_from": path, "seed": cfg.seed}


def check_same(saved: dict, current: dict, where: str) -> None:
  """Refuses to resume a workdir whose checkpoints were trained with other adapters (LoRA on or
  off, another rank, alpha, targets or dropout) or, with LoRA, on another base. `saved` and
  `current` are checkpoint metadata (`model` fields and BASE); raises LimaError."""
  old_model, new_model = saved.get("model", {}), current["model"]
  old_rank, new_rank = old_model.get("lora_rank", 0), new_model["lora_rank"]
  if not (old_rank or new_rank):
    return  # full fine-tuning both times
  if not (old_rank and new_rank):  # LoRA turned on or off: its other settings mean nothing
    changed = [("lora.rank", old_rank, new_rank)]
  else:
    changed = [(f"lora.{key[len('lora_'):]}", _plain(old_model.get(key)), _plain(new_model[key]))
               for key in FIELDS if _plain(old_model.get(key)) != _plain(new_model[key])]
  if not changed:  # the frozen base: init_from, or the seed's init
    old_base = saved.get(BASE) or {}
    changed = [(key, old_base.get(key), value) for key, value in current[BASE].items()
               if old_base.get(key) != value]
  if changed:
    raise LimaError(
        f"{', '.join(c[0] for c in changed)}: the checkpoints in {where} were trained with "
        f"{', '.join(f'{k}={old!r}' for k, old, _ in changed)}, the config gives "
        f"{', '.join(f'{k}={new!r}' for k, _, new in changed)}; rerun with the workdir's values, "
        "or use a fresh --workdir")


def _plain(value):
  return ",".join(value) if isinstance(value, (list, tuple)) else value


class Adapter(nnx.Module):
  """The low-rank path of one projection: x [..., *inputs] -> [..., *outputs] in x's dtype.

  Shapes: A [prod(inputs), rank], B [rank, prod(outputs)]; the flattened feature axis is named
  'embed' when it is the model dimension, else 'lora_features' (heads x head_dim, or the FFN
  width), which the sharding table splits over fsdp and tensor together: split over tensor
  alone, as the base's heads / mlp axes are, those adapters would be whole on every fsdp shard
  (about 6 GiB per chip for LLaMA-65B at rank 64). Params in fp32 whatever the base's dtype,
  the matmuls in the compute dtype.
  """

  def __init__(self, target: Target, dims: dict, rank: int, alpha: float, dropout: float,
               compute_dtype, rngs: nnx.Rngs):
    self.in_shape = tuple(dims[n] for n in target.inputs)
    self.out_shape = tuple(dims[n] for n in target.outputs)
    self.scale = alpha / rank  # PEFT's `scaling` without rsLoRA
    self.dropout = dropout
    fan_in = math.prod(self.in_shape)
    self.lora = nnx.LoRA(
        fan_in, rank, math.prod(self.out_shape), dtype=compute_dtype, param_dtype=jnp.float32,
        a_initializer=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        lora_param_type=nnx.Param, rngs=rngs,
        a_metadata={"out_sharding": (_feature_name(target.inputs[0]), "lora_rank")},
        b_metadata={"out_sharding": ("lora_rank", _feature_name(target.outputs[0]))})

  def __call__(self, x, key=None):
    """key: dropout on the adapter's input (training); None: no dropout."""
    if key is not None and self.dropout > 0:
      keep = 1.0 - self.dropout
      x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, jnp.zeros_like(x))
    batch = x.shape[:x.ndim - len(self.in_shape)]
    out = self.lora(x.reshape(*batch, -1)) * jnp.asarray(self.scale, x.dtype)
    return out.reshape(*batch, *self.out_shape)


def _feature_name(name: str) -> str:
  return "embed" if name == "embed" else "lora_features"


def attach(cfg, modules: dict, rngs: nnx.Rngs) -> None:
  """Gives each targeted module of a decoder block ({'attn': ..., 'mlp': ...}) its adapters,
  as attributes `lora_<target>`; nothing when cfg.lora_rank is 0."""
  if cfg.lora_rank <= 0:
    return
  dims = {"embed": cfg.d_model, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
          "head_dim": cfg.head_dim, "mlp": cfg.ffn_dim}
  for name in cfg.lora_targets:
    target = TARGETS[name]
    setattr(modules[target.module], PREFIX + name,
            Adapter(target, dims, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                    cfg.compute_dtype, rngs))


def adapted(module: nnx.Module, name: str, x, y, key=None):
  """y (the base projection of x) plus the adapter `lora_<name>` of `module` applied to x; y
  itself, untouched, when there is no such adapter. key: the block's adapter dropout key."""
  found = getattr(module, PREFIX + name, None)
  if found is None:
    return y
  return y + found(x, None if key is None else jax.random.fold_in(key, list(TARGETS).index(name)))


# The pure-dict param tree (`nnx.to_pure_dict` of the model's params) split by kind.

def _select(tree, keep) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      value = _select(value, lambda path, k=key: keep((k, *path)))
      if value:
        out[key] = value
    elif keep((key,)):
      out[key] = value
  return out


def adapters(params: dict) -> dict:
  """The adapter leaves of a param tree (the same nesting, nothing else)."""
  return _select(params, lambda path: any(str(k).startswith(PREFIX) for k in path))


def frozen(params: dict) -> dict:
  """Everything but the adapters: the base model's params."""
  return _select(params, lambda path: not any(str(k).startswith(PREFIX) for k in path))


def join(base: dict, extra: dict) -> dict:
  """The two trees' leaves in one tree (the adapters put back beside their base weights)."""
  out = dict(base)
  for key, value in extra.items():
    out[key] = join(out[key], value) if isinstance(value, dict) and key in out else value
  return out


def factors(params: dict, name: str) -> tuple:
  """(A [layers, in, rank], B [layers, rank, out]) of target `name`'s adapter in a param tree
  (or in the `adapters` of one)."""
  pair = params["blocks"][TARGETS[name].module][PREFIX + name]["lora"]
  return pair["lora_a"], pair["lora_b"]


def merged(params: dict, cfg, dtype) -> dict:
  """The base params with every adapter folded in, all in `dtype`: W + (alpha / rank) A B per
  layer, computed in fp32 and rounded once, to `dtype` (rounding to a bf16 base's dtype first
  would lose about a tenth of the adapters' effect on the logits of a small model). `cfg` is
  the LlamaConfig that built `params`. Without adapters the params come back as they are."""
  if cfg.lora_rank <= 0:
    return params
  out = jax.tree.map(lambda x: x.astype(dtype), frozen(params))
  blocks = {module: dict(weights) for module, weights in out["blocks"].items()}
  for name in cfg.lora_targets:
    target = TARGETS[name]
    a, b = (x.astype(jnp.float32) for x in factors(params, name))
    w = params["blocks"][target.module][target.weight]
    update = (cfg.lora_alpha / cfg.lora_rank) * jnp.einsum("lir,lro->lio", a, b)
    blocks[target.module][target.weight] = (w.astype(jnp.float32)
                                            + update.reshape(w.shape)).astype(dtype)
  out["blocks"] = blocks
  return out
