"""LoRA adapters in PEFT's format: the directory `peft.PeftModel.from_pretrained(base, DIR)` loads.

  DIR/adapter_model.safetensors  base_model.model.model.layers.<i>.<module>.lora_A.weight
                                 [rank, in] and ...lora_B.weight [out, rank], in fp32; when the
                                 run trained the rows of tokens it added (a new EOT:
                                 `lima_jax.trained`), also base_model.model.model.
                                 embed_tokens.weight and base_model.model.lm_head.weight
                                 [vocab, d] with those rows as trained (PEFT's
                                 `save_embedding_layers`), loaded over a base resized to `vocab`
                                 rows
  DIR/adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, ...
  DIR/tokenizer files            as in an HF export (`hf_tokenizer`)

The key names and config fields are those peft 0.21's `PeftModel.save_pretrained` writes for a
transformers LlamaForCausalLM (a scratch save, embedding layers included after
`resize_token_embeddings`). Our q/k weights keep HF's rotate-half row order and a flattened
(heads, head_dim) axis is heads-major, as HF's Linear rows and columns are, so each layer's A
[in, rank] and B [rank, out] transposed are PEFT's lora_A and lora_B.
"""

import json
import os

import jax
import numpy as np

from lima_jax import lora
from lima_jax.data import ChatTokenizer
from lima_jax.errors import LimaError
from lima_jax.weights import hf_tokenizer, layout, safetensors_io

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM
EMBEDDING_NAMES = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


def module_name(target: str) -> str:
  """PEFT's target_modules entry for one of our targets: the Linear's own name (q_proj, ...)."""
  return lora.TARGETS[target].hf_name.rsplit(".", 1)[-1]


def adapter_config(model_cfg, base: str | None) -> dict:
  """adapter_config.json for `model_cfg`'s adapters (PEFT's scaling alpha / r is ours)."""
  alpha = model_cfg.lora_alpha
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
      "r": model_cfg.lora_rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": model_cfg.lora_dropout,
      "target_modules": [module_name(t) for t in model_cfg.lora_targets],
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
  }


def write_dir(out_dir: str, model_cfg, adapters: dict, *, tokenizer: ChatTokenizer,
              base: str | None, embeddings: dict | None = None) -> list[str]:
  """Writes the PEFT directory of a LoRA model.

  adapters: the trained part of the params (`Trained.part`; device or host arrays, A [L, in,
  rank], B [L, rank, out]); embeddings: None, or {'embed': [padded_vocab, d], 'lm_head': [d,
  padded_vocab] (absent when tied)}, the tables with their trained rows, for a run whose EOT is
  a row the base lacks; base: the HF
  directory or hub id of the base model, or None. Raises LimaError for a non-empty out_dir.
  Returns the files written."""
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise LimaError(f"{out_dir}: exists and is not empty; choose a new output directory")
  host = jax.device_get(adapters)  # rank-r matrices: small beside the model
  entries = []
  for target in model_cfg.lora_targets:
    spec = lora.TARGETS[target]
    a, b = (np.asarray(x, np.float32) for x in lora.factors(host, target))
    for layer in range(model_cfg.n_layers):
      name = f"{PREFIX}model.layers.{layer}.{spec.hf_name}"
      entries.append((f"{name}.lora_A.weight", a.shape[2:0:-1], np.float32,
                      lambda x=a[layer]: x.T))
      entries.append((f"{name}.lora_B.weight", b.shape[2:0:-1], np.float32,
                      lambda x=b[layer]: x.T))
  if embeddings is not None:
    vocab = model_cfg.vocab_size
    embed = embeddings["embed"]
    head = embeddings.get("lm_head")
    rows = {"embed": lambda: np.asarray(embed)[:vocab],
            "lm_head": (lambda: np.asarray(embed)[:vocab]) if head is None else
                       (lambda: layout.to_linear("lm_head", np.asarray(head)[:, :vocab]))}
    dtype = np.dtype(embed.dtype)
    for name, hf_name in EMBEDDING_NAMES.items():
      entries.append((PREFIX + hf_name, (vocab, model_cfg.d_model), dtype, rows[name]))
  entries.sort(key=lambda e: e[0])
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, WEIGHTS)
  safetensors_io.write(path, entries)
  with open(os.path.join(out_dir, CONFIG), "w", encoding="utf-8") as f:
    json.dump(adapter_config(model_cfg, base), f, indent=2, sort_keys=True)
    f.write("\n")
  hf_tokenizer.write(out_dir, tokenizer)
  return [path, os.path.join(out_dir, CONFIG)]
