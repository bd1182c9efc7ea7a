"""`python -m lima_jax.convert`: LLaMA weights into training and back out.

  python -m lima_jax.convert hf-to-orbax   HF_DIR   OUT_DIR   # config.json + *.safetensors
  python -m lima_jax.convert meta-to-orbax META_DIR OUT_DIR   # params.json + consolidated.*.pth
  python -m lima_jax.convert gguf-to-orbax MODEL.gguf OUT_DIR # llama.cpp's format, dequantised
  python -m lima_jax.convert gguf-to-hf    MODEL.gguf OUT_DIR # the same, as an HF directory
  python -m lima_jax.convert orbax-to-hf   CKPT_DIR OUT_DIR   # for transformers / vLLM
  python -m lima_jax.convert orbax-to-hf   CKPT_DIR OUT_DIR --peft  # a LoRA run's adapters

HF and Meta imports add LIMA's EOT token (a new row after the weights' rows, the mean of the
others; or --eot-token names an existing one), pad the vocabulary for the TPU and copy the
tokenizer's files next to the weights; train from the result with `--config.init_from=OUT_DIR`.
A GGUF file's tokenizer, rebuilt from its metadata, is written as tokenizer.json; its EOT is the
file's own end token (`<|im_end|>` for chat models such as SmolLM2) unless --eot-token names
another, so the vocabulary stays as it is. CKPT_DIR is such an import or a training workdir
(its latest checkpoint, or --step); a LoRA run's export is its base with the adapters merged
in, or with --peft the adapters alone for `peft.PeftModel.from_pretrained`. Every conversion
reports the peak host memory it used.
"""

import argparse
import os
import resource
import sys
import time

import jax
import ml_dtypes
import numpy as np

from lima_jax import data, lora_export, sharding
from lima_jax.cli import quiet_logs
from lima_jax.errors import LimaError
from lima_jax.model import LlamaConfig
from lima_jax.weights import gguf, hf, layout, meta, pretrained

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def import_model(source, out_dir: str, *, tokenizer: str | None = None, eot_token: str = "",
                 param_dtype: str = "float32", mesh=None) -> dict:
  """Streams `source` (an HfSource or MetaSource) onto the mesh and saves our params dir, with
  the tokenizer's files (`tokenizer`: a file or directory; default: the source's own).

  Returns the model fields written."""
  path = tokenizer or source.tokenizer()
  if path is None:
    raise LimaError(f"{source.path}: holds no tokenizer.json or tokenizer.model; "
                    "pass --tokenizer=PATH")
  rows = source.fields["vocab_size"]
  chat = data.load_tokenizer(path, eot_token=eot_token, source_rows=rows, what="--tokenizer")
  vocab, add_eot = pretrained.vocab_plan(rows, chat, source.path)
  fields = dict(source.fields, vocab_size=vocab)
  model_cfg = LlamaConfig(**fields, param_dtype=param_dtype)
  mesh = mesh or sharding.make_mesh(1, -1, 1)
  params = layout.place(source, pretrained.abstract_params(model_cfg, mesh), add_eot)
  pretrained.save(out_dir, params, fields, tokenizer=chat, extras=source.extras,
                  source=source.path)
  return fields


def import_gguf(path: str, out_dir: str, *, eot_token: str = "", param_dtype: str = "float32",
                mesh=None) -> dict:
  """A GGUF file, dequantised and streamed onto the mesh, saved as our params dir with the
  tokenizer rebuilt from its metadata. EOT: `eot_token`, default the file's own end token.
  Returns the model fields written."""
  source = gguf.GgufSource(path)
  return import_model(source, out_dir, eot_token=eot_token or source.eos_token(),
                      param_dtype=param_dtype, mesh=mesh)


class _Layers:
  """A stacked param of a source, one layer at a time: `hf.write_dir` indexes it by layer."""

  def __init__(self, source, name: str):
    self._source, self._name = source, name

  def __getitem__(self, layer: int):
    return self._source.tensor(self._name, layer)


def gguf_to_hf(path: str, out_dir: str, *, eot_token: str = "", dtype: str = "float32",
               shard_gb: float = 5.0) -> list[str]:
  """A GGUF file as an HF directory (safetensors, config.json, tokenizer.json with the file's
  chat template), one tensor dequantised at a time."""
  source = gguf.GgufSource(path)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise LimaError(f"{out_dir}: exists and is not empty; choose a new output directory")
  has_template = source.value("tokenizer.chat_template") is not None
  tokenizer = data.load_tokenizer(source.tokenizer(), eot_token=eot_token or source.eos_token(),
                                  chat_format="template" if has_template else "lima",
                                  source_rows=source.fields["vocab_size"], what=path)

  def fetch(full):
    if full.startswith("blocks."):
      return _Layers(source, full[len("blocks."):])
    return source.tensor(full)

  return hf.write_dir(out_dir, source.fields, fetch, tokenizer=tokenizer, extras=source.extras,
                      dtype=_DTYPES[dtype], shard_bytes=int(shard_gb * (1 << 30)))


def export_hf(ckpt_dir: str, out_dir: str, *, step: int | None = None,
              dtype: str | None = None, shard_gb: float = 5.0, peft: bool = False) -> list[str]:
  """Writes an HF directory from our checkpoint, one param on the host at a time. A LoRA run's
  checkpoint gives its merged model (base + adapters, `lora_export.merged`), or with peft=True
  its adapters alone in PEFT's format; peft=True on other checkpoints raises LimaError."""
  params = pretrained.OrbaxParams(ckpt_dir, step)
  if peft:
    return lora_export.write_peft(lora_export.kept_checkpoint(params), params, out_dir,
                                  flag="--peft")
  tokenizer = params.tokenizer()
  if tokenizer is None:
    raise LimaError(f"{ckpt_dir}: its tokenizer ({params.tokenizer_path}) is missing")
  fields, fetch = params.fields, params.host
  if params.lora_rank:  # the checkpoint holds adapters alone: merge them into the base
    # In the dtype asked for (default fp32), never rounded to a bf16 base's dtype on the way.
    fields, tree = lora_export.merged(lora_export.kept_checkpoint(params), params, dtype)
    fetch = lora_export.fetcher(tree)
  if dtype is None:  # keep the stored precision (a LoRA merge's: fp32), so a round trip is exact
    dtype = str(fetch("final_norm.scale").dtype)
  return hf.write_dir(out_dir, fields, fetch, tokenizer=tokenizer,
                      extras=params.extras, dtype=_DTYPES[dtype],
                      shard_bytes=int(shard_gb * (1 << 30)))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m lima_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, what in (("hf-to-orbax", "HF_DIR"), ("meta-to-orbax", "META_DIR")):
    sub = commands.add_parser(name, help=f"{what} -> our params checkpoint")
    sub.add_argument("source", metavar=what)
    sub.add_argument("out", metavar="OUT_DIR")
    sub.add_argument("--tokenizer", help="tokenizer.json, tokenizer.model (sentencepiece or "
                     "LLaMA-3 tiktoken) or a directory holding one (default: SOURCE's own)")
    sub.add_argument("--eot-token", default="", help="an existing special token to use as EOT "
                     "(e.g. '<|eot_id|>'); default: a new token after the vocabulary")
    sub.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                     help="dtype of the saved params (training keeps fp32 params)")
  for name, what in (("gguf-to-orbax", "our params checkpoint"), ("gguf-to-hf", "HF_DIR")):
    sub = commands.add_parser(name, help=f"MODEL.gguf (LLaMA architecture) -> {what}")
    sub.add_argument("source", metavar="MODEL.gguf")
    sub.add_argument("out", metavar="OUT_DIR")
    sub.add_argument("--eot-token", default="", help="the token that ends a turn (default: the "
                     "file's own end token, tokenizer.ggml.eos_token_id)")
    sub.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                     help="dtype the weights are dequantised to")
    if name == "gguf-to-hf":
      sub.add_argument("--shard-gb", type=float, default=5.0, help="safetensors shard size")
  sub = commands.add_parser("orbax-to-hf", help="our checkpoint -> HF_DIR")
  sub.add_argument("source", metavar="CKPT_DIR")
  sub.add_argument("out", metavar="OUT_DIR")
  sub.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
  sub.add_argument("--dtype", choices=sorted(_DTYPES), help="default: as stored (a LoRA run's "
                   "merged model: float32)")
  sub.add_argument("--shard-gb", type=float, default=5.0, help="safetensors shard size")
  sub.add_argument("--peft", action="store_true", help="a LoRA run: its adapters alone in "
                   "PEFT's format (adapter_model.safetensors + adapter_config.json) instead of "
                   "the merged model")
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  quiet_logs()
  started = time.perf_counter()
  try:
    if args.command == "orbax-to-hf":
      files = export_hf(args.source, args.out, step=args.step, dtype=args.dtype,
                        shard_gb=args.shard_gb, peft=args.peft)
      what = "PEFT adapters" if args.peft else f"{len(files)} safetensors file(s)"
    elif args.command == "gguf-to-hf":
      files = gguf_to_hf(args.source, args.out, eot_token=args.eot_token, dtype=args.dtype,
                         shard_gb=args.shard_gb)
      what = f"{len(files)} safetensors file(s) + tokenizer.json"
    elif args.command == "gguf-to-orbax":
      fields = import_gguf(args.source, args.out, eot_token=args.eot_token,
                           param_dtype=args.dtype)
      what = (f"{fields['n_layers']} layers, d_model {fields['d_model']}, vocabulary "
              f"{fields['vocab_size']}, tokenizer.json, on {jax.device_count()} device(s)")
    else:
      opener = hf.HfSource if args.command == "hf-to-orbax" else meta.MetaSource
      fields = import_model(opener(args.source), args.out, tokenizer=args.tokenizer,
                            eot_token=args.eot_token, param_dtype=args.dtype)
      what = (f"{fields['n_layers']} layers, d_model {fields['d_model']}, vocabulary "
              f"{fields['vocab_size']} with EOT, on {jax.device_count()} device(s)")
  except LimaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.command}: {args.source} -> {args.out}: {what}; "
        f"{time.perf_counter() - started:.1f}s, peak host RSS {peak_rss_bytes() / 2**30:.2f} GiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
