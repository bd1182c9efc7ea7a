"""Which params a run trains: the one answer that init, restore, the optimizer, checkpoints,
exports and the planner read (`Trained`, held by the `Trainer` as `trainer.trained`).

Full fine-tuning (lora.rank 0) trains every param. With LoRA the base stays frozen and what
trains is
- the adapters (`lima_jax.lora`), and
- the embedding and LM-head rows of the tokens the run adds to the pretrained vocabulary
  (`token_rows`). The one such token is LIMA's EOT when it is its own `<|eot|>`, a row no
  pretrained model has (added by the run, or by the import it starts from), initialised to the
  mean of the other rows: frozen there, its logit stays the mean of the other logits, p(EOT) <=
  1/V whatever the adapters learn, and the model never ends a turn. PEFT
  (`trainable_token_indices`) and LLaMA-Factory train a new token's rows for the same reason.
  An existing token named as EOT (data.eot_token) and the padding rows up to a multiple of 128
  are not added tokens: they stay frozen.

Trained rows are fp32, as the adapters are: with token rows the embedding and LM head are kept
in fp32 whatever model.param_dtype says (`tables_in_fp32`; their frozen rows keep their values;
LLaMA-65B's two tables take 1 GB more over the slice), since a bf16 row rounds away most of an
update at LoRA's learning rates.

A param tree splits into `part` (what trains: what the optimizer state covers and what a
checkpoint or an epoch's export holds) and `rest` (the frozen base, loaded again from where the
run loaded it); `join` puts them back together. The part is the adapters in the tree's own
nesting plus, with token rows, {'token_rows': {'embed': [rows, d_model], 'lm_head': [d_model,
rows]}} (no lm_head when the embeddings are tied). `part` and `rest` also take trees of
ShapeDtypeStructs or shardings shaped like the params (a part's rows are replicated: a few rows).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lima_jax import lora
from lima_jax.data.chat_format import EOT_TEXT
from lima_jax.errors import LimaError

ROWS = "token_rows"  # the part's key for the trained rows, and the checkpoint metadata's
TABLES = {"embed": 0, "lm_head": 1}  # each vocabulary table's vocabulary axis


def added_tokens(tokenizer: dict | None) -> tuple[int, ...]:
  """Ids of the tokens a run adds to the pretrained vocabulary: LIMA's EOT when it is its own
  token (`<|eot|>`), else none. tokenizer: a `ChatTokenizer.meta()`."""
  if tokenizer and tokenizer.get("eot_token") == EOT_TEXT:
    return (int(tokenizer["eot_id"]),)
  return ()


@dataclasses.dataclass(frozen=True)
class Trained:
  """lora: the adapters train and the base is frozen (else every param trains); token_rows:
  with LoRA, ids whose embedding and LM-head rows train too."""
  lora: bool = False
  token_rows: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "token_rows", tuple(int(i) for i in self.token_rows))
    if self.token_rows and not self.lora:
      raise ValueError("token rows train beside LoRA's adapters; without LoRA every row trains")
    if len(set(self.token_rows)) != len(self.token_rows):
      raise ValueError(f"token rows {self.token_rows}: an id twice")

  @classmethod
  def of_run(cls, model_cfg, tokenizer: dict | None) -> "Trained":
    """What a new run trains: every param, or with LoRA the adapters and the rows of the tokens
    it adds (`added_tokens`). tokenizer: the run's `ChatTokenizer.meta()`."""
    if model_cfg.lora_rank <= 0:
      return cls()
    rows = added_tokens(tokenizer)
    if any(i >= model_cfg.vocab_size for i in rows):
      raise LimaError(f"token rows {rows}: past the vocabulary of {model_cfg.vocab_size}")
    return cls(True, rows)

  @classmethod
  def recorded(cls, meta: dict) -> "Trained":
    """What the run of checkpoint metadata `meta` trained (`record`); LoRA runs recorded before
    token rows trained, trained their adapters alone."""
    return cls(meta.get("model", {}).get("lora_rank", 0) > 0, tuple(meta.get(ROWS) or ()))

  def record(self) -> dict:
    """What checkpoint metadata holds of this, for `recorded`."""
    return {ROWS: list(self.token_rows)} if self.lora else {}

  def describe(self) -> str:
    """'', or what trains beside the base in words, e.g. 'LoRA adapters and the embedding rows
    of 1 added token'."""
    if not self.lora:
      return ""
    rows = len(self.token_rows)
    return "LoRA adapters" + (f" and the embedding rows of {rows} added token"
                              f"{'s' if rows > 1 else ''}" if rows else "")

  def part(self, tree):
    """The part of a param tree (or of a tree shaped like it) that trains."""
    if not self.lora:
      return tree
    out = lora.adapters(tree)
    if self.token_rows:
      out[ROWS] = {name: _take(tree[name], self.token_rows, axis)
                   for name, axis in TABLES.items() if name in tree}
    return out

  def rest(self, tree):
    """The base model's params of a param tree: everything but the adapters (with LoRA the
    frozen base, the trained rows' old values in it; without LoRA all of it trains, and `join`
    takes the part alone)."""
    return lora.frozen(tree)

  def join(self, rest, part):
    """The param tree of `rest` and `part` (a part without rows keeps the rest's rows)."""
    if not self.lora:
      return part
    part = dict(part)
    rows = part.pop(ROWS, {})
    out = lora.join(rest, part)
    for name, values in rows.items():
      out[name] = _put(out[name], values, self.token_rows, TABLES[name])
    return out

  def tables_in_fp32(self, params: dict) -> dict:
    """params with the embedding and LM head in fp32 when rows of them train."""
    if not self.token_rows:
      return params
    return dict(params, **{n: params[n].astype(jnp.float32) for n in TABLES if n in params})


def check_resumable(saved: dict, current: dict, where: str) -> None:
  """Refuses to resume a workdir whose checkpoints trained other params: other adapters or base
  (`lora.check_same`), or other token rows (say, a LoRA run with a new EOT recorded before
  token rows trained). `saved`, `current`: checkpoint metadata. Raises LimaError."""
  lora.check_same(saved, current, where)
  old, new = Trained.recorded(saved), Trained.recorded(current)
  if old.lora and old.token_rows != new.token_rows:
    raise LimaError(
        f"{where}: its checkpoints train the embedding rows of tokens "
        f"{list(old.token_rows)}, this run would train those of {list(new.token_rows)} (the "
        "tokens it adds to the vocabulary, such as a new EOT); use a fresh --workdir")


def _replicated(sharding):
  return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(
      sharding, NamedSharding) else None


def _take(x, ids, axis: int):
  """Rows `ids` of x along `axis`: arrays (traced, on devices or on the host), ShapeDtypeStructs
  or shardings."""
  if isinstance(x, jax.sharding.Sharding):
    return _replicated(x)
  shape = tuple(len(ids) if i == axis else n for i, n in enumerate(x.shape))
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=x.sharding and _replicated(x.sharding))
  if isinstance(x, np.ndarray):
    return np.take(x, ids, axis=axis)
  index = np.asarray(ids)
  if isinstance(x, jax.core.Tracer):
    return jnp.take(x, index, axis=axis)
  # On sharded arrays outside a jitted step: jitted, never eager.
  return jax.jit(lambda t: jnp.take(t, index, axis=axis),
                 out_shardings=_replicated(x.sharding))(x)


def _put(x, values, ids, axis: int):
  """x with its rows `ids` along `axis` set to `values` (cast to x's dtype)."""
  index = np.asarray(ids)

  def put(table, v):
    # Unique ids (checked in Trained): the gradient is a gather, not a table-sized u32 scatter
    # of which update won, that XLA constant-folds for minutes on a 49K vocabulary.
    v = v.astype(table.dtype)
    at = table.at[index] if axis == 0 else table.at[:, index]
    return at.set(v, unique_indices=True)

  if isinstance(x, np.ndarray):
    out = x.copy()
    if axis == 0:
      out[index] = values
    else:
      out[:, index] = values
    return out
  if isinstance(x, jax.core.Tracer):
    return put(x, values)
  return jax.jit(put, out_shardings=x.sharding)(x, values)
