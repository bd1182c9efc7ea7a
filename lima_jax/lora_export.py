"""What a LoRA run's kept params export as: the merged model, or the adapters for PEFT.

A LoRA run's checkpoints and epoch exports hold what it trains alone (the adapters, and the rows
of tokens it adds: `lima_jax.trained`). `merged` reloads the frozen base where the run loaded it
(`generate.restore_kept`), puts the trained rows in and folds the adapters in on the device
(W + (alpha / rank) A B computed in fp32 and rounded once to the export's dtype, fp32 unless
asked: `lora.merged`): the plain model that `convert orbax-to-hf` and `select --choose` write (HF
or our params dir). `write_peft` writes the trained part alone in PEFT's format (`weights.peft`),
for a base the user already has.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax import generate, lora, run_files
from lima_jax.errors import LimaError
from lima_jax.trained import Trained
from lima_jax.weights import hf, layout, peft


def kept_checkpoint(source) -> run_files.Kept:
  """The `run_files.Kept` of an opened `pretrained.OrbaxParams` (a CKPT_DIR and step)."""
  meta = source.meta
  epoch = meta.get("epoch")
  whole = isinstance(epoch, (int, float)) and float(epoch).is_integer()
  return run_files.Kept(source.ckpt_dir, source.step, int(meta.get("step", source.step)),
                        int(epoch) if whole else None, meta)


def is_lora(kept: run_files.Kept) -> bool:
  return kept.meta.get("model", {}).get("lora_rank", 0) > 0


def merged(kept: run_files.Kept, source, dtype: str | None = None) -> tuple[dict, dict]:
  """(model fields, params on the mesh) of the kept params as one plain model: a LoRA run's
  base with its trained rows and adapters folded in, no adapter left, every param in `dtype`
  (default float32, the adapters' precision: merged into a bf16 base and rounded to bf16, about
  a tenth of the adapters' effect on a small model's logits was lost); other runs' params as
  they are. Raises LimaError when a LoRA run's base is gone."""
  trainer, params = generate.restore_kept(kept, source)
  fields = layout.model_fields(kept.meta["model"])  # no LoRA fields: a plain model
  if trainer.uses_lora:
    dtype = jnp.dtype(dtype or "float32")
    # The base's buffers are donated when the merge keeps their dtype (W + scale A B replaces
    # W): the model is not held twice.
    same = all(x.dtype == dtype for x in jax.tree.leaves(trainer.frozen(params)))
    fold = jax.jit(lambda p: lora.merged(p, trainer.model_cfg, dtype),
                   donate_argnums=0 if same else (),
                   out_shardings=trainer.frozen(trainer.state_shardings["params"]))
    params = fold(params)
  return fields, params


def fetcher(params: dict):
  """fetch(dotted param name) -> that param as a host array, for `hf.write_dir`."""
  def fetch(name: str) -> np.ndarray:
    tree = params
    for key in name.split("."):
      tree = tree[key]
    return np.asarray(jax.device_get(tree))
  return fetch


def write_peft(kept: run_files.Kept, source, out_dir: str, *, flag: str) -> list[str]:
  """The adapters of a LoRA run's kept params in PEFT's format, with its tokenizer; the whole
  embedding and LM head too, trained rows included, when the run trained the rows of tokens it
  added or added a new EOT row (the base lacks it). adapter_config.json names the base when
  init_from was an HF directory. Raises LimaError naming `flag` for params without adapters."""
  if not is_lora(kept):
    raise LimaError(f"{flag}: {kept.directory} step {kept.number} holds a fully fine-tuned "
                    "model (lora.rank=0), no LoRA adapters; export it without " + flag)
  tokenizer = source.tokenizer()
  if tokenizer is None:
    raise LimaError(f"{kept.directory}: its tokenizer ({source.tokenizer_path}) is missing")
  # Runs recorded before token rows trained added a new EOT row without training it.
  tables = bool(Trained.recorded(kept.meta).token_rows or kept.meta["tokenizer"].get("adds_eot"))
  # The base is read only for its embedding and LM head.
  trainer, params = generate.restore_kept(kept, source, base=tables)
  embeddings = {k: params[k] for k in layout.VOCAB_PARAMS if k in params} if tables else None
  adapters = trainer.trainable(params) if tables else params
  return peft.write_dir(out_dir, trainer.model_cfg, adapters, tokenizer=tokenizer,
                        base=hf_base(kept.meta), embeddings=embeddings)


def hf_base(meta: dict) -> str | None:
  """The run's init_from when it is an HF directory (PEFT's base_model_name_or_path)."""
  path = (meta.get(lora.BASE) or {}).get("init_from")
  return path if path and os.path.isfile(os.path.join(path, hf.CONFIG)) else None
