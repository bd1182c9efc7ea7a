"""`python -m lima_jax.convert`: LLaMA weights into training and back out.

  python -m lima_jax.convert hf-to-orbax   HF_DIR   OUT_DIR   # config.json + *.safetensors
  python -m lima_jax.convert meta-to-orbax META_DIR OUT_DIR   # params.json + consolidated.*.pth
  python -m lima_jax.convert gguf-to-orbax MODEL.gguf OUT_DIR # llama.cpp's format, dequantised
  python -m lima_jax.convert gguf-to-hf    MODEL.gguf OUT_DIR # the same, as an HF directory
  python -m lima_jax.convert orbax-to-hf   CKPT_DIR OUT_DIR   # for transformers / vLLM

HF and Meta imports add LIMA's EOT token (vocabulary + 1, its rows the mean of the others), pad
the vocabulary for the TPU and copy the tokenizer next to the weights; train from the result with
`--config.init_from=OUT_DIR`. A GGUF file keeps its vocabulary (its chat models end turns with a
token of their own, such as `<|im_end|>`) and its tokenizer is written as tokenizer.json.
CKPT_DIR is such an import or a training workdir (its latest checkpoint, or --step). Every
conversion reports the peak host memory it used.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

from lima_jax import sharding
from lima_jax.cli import quiet_logs
from lima_jax.errors import LimaError
from lima_jax.model import LlamaConfig
from lima_jax.weights import gguf, hf, layout, meta, pretrained

_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def import_model(source, out_dir: str, *, tokenizer: str | None = None,
                 param_dtype: str = "float32", mesh=None) -> dict:
  """Streams `source` (an HfSource or MetaSource) onto the mesh and saves our params dir.

  Returns the model fields written."""
  tokenizer = tokenizer or source.tokenizer()
  if tokenizer is None:
    raise LimaError(f"{source.path}: no tokenizer.model; pass --tokenizer=PATH")
  pieces, _ = pretrained.tokenizer_info(tokenizer)
  vocab, add_eot = pretrained.vocab_plan(source.fields["vocab_size"], pieces, source.path)
  fields = dict(source.fields, vocab_size=vocab)
  model_cfg = LlamaConfig(**fields, param_dtype=param_dtype)
  mesh = mesh or sharding.make_mesh(1, -1, 1)
  params = layout.place(source, pretrained.abstract_params(model_cfg, mesh), add_eot)
  pretrained.save(out_dir, params, fields, tokenizer_path=tokenizer, extras=source.extras,
                  source=source.path)
  return fields


def import_gguf(path: str, out_dir: str, *, param_dtype: str = "float32", mesh=None) -> dict:
  """A GGUF file, dequantised and streamed onto the mesh, saved as our params dir with its
  tokenizer.json. Returns the model fields written."""
  source = gguf.GgufSource(path)
  if os.path.exists(out_dir) and os.listdir(out_dir):  # before any work, as `pretrained.save`
    raise LimaError(f"{out_dir}: exists and is not empty; choose a new output directory")
  model_cfg = LlamaConfig(**source.fields, param_dtype=param_dtype)
  mesh = mesh or sharding.make_mesh(1, -1, 1)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = source.write_tokenizer(tmp)  # a bad tokenizer fails before the weights move
    params = layout.place(source, pretrained.abstract_params(model_cfg, mesh), add_eot=False)
    pretrained.save(out_dir, params, source.fields, tokenizer_path=tokenizer,
                    extras=source.extras, source=path)
  return source.fields


class _Layers:
  """A stacked param of a source, one layer at a time: `hf.write_dir` indexes it by layer."""

  def __init__(self, source, name: str):
    self._source, self._name = source, name

  def __getitem__(self, layer: int):
    return self._source.tensor(self._name, layer)


def gguf_to_hf(path: str, out_dir: str, *, dtype: str = "float32",
               shard_gb: float = 5.0) -> list[str]:
  """A GGUF file as an HF directory (safetensors, config.json, tokenizer.json), one tensor
  dequantised at a time."""
  source = gguf.GgufSource(path)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise LimaError(f"{out_dir}: exists and is not empty; choose a new output directory")
  with tempfile.TemporaryDirectory() as tmp:
    source.write_tokenizer(tmp)  # a bad tokenizer fails before anything is written
  def fetch(full):
    if full.startswith("blocks."):
      return _Layers(source, full[len("blocks."):])
    return source.tensor(full)
  eos = source.value("tokenizer.ggml.eos_token_id", source.extras["bos_token_id"])
  files = hf.write_dir(out_dir, source.fields, fetch, tokenizer_path=None, eot_id=int(eos),
                       extras=source.extras, dtype=_DTYPES[dtype],
                       shard_bytes=int(shard_gb * (1 << 30)))
  source.write_tokenizer(out_dir)
  return files


def export_hf(ckpt_dir: str, out_dir: str, *, step: int | None = None,
              dtype: str | None = None, shard_gb: float = 5.0) -> list[str]:
  """Writes an HF directory from our checkpoint, one param on the host at a time."""
  params = pretrained.OrbaxParams(ckpt_dir, step)
  tokenizer = params.tokenizer()
  if tokenizer is None:
    raise LimaError(f"{ckpt_dir}: its tokenizer file is missing")
  pieces, _ = pretrained.tokenizer_info(tokenizer)
  if params.fields["vocab_size"] != pieces + 1:
    raise LimaError(f"{ckpt_dir}: vocabulary {params.fields['vocab_size']} is not the "
                    f"tokenizer's {pieces} pieces + EOT")
  if dtype is None:  # keep the stored precision, so a round trip is exact
    dtype = str(params.host("final_norm.scale").dtype)
  return hf.write_dir(out_dir, params.fields, params.host, tokenizer_path=tokenizer,
                      eot_id=pieces, extras=params.extras, dtype=_DTYPES[dtype],
                      shard_bytes=int(shard_gb * (1 << 30)))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m lima_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  for name, what in (("hf-to-orbax", "HF_DIR"), ("meta-to-orbax", "META_DIR")):
    sub = commands.add_parser(name, help=f"{what} -> our params checkpoint")
    sub.add_argument("source", metavar=what)
    sub.add_argument("out", metavar="OUT_DIR")
    sub.add_argument("--tokenizer", help="sentencepiece model (default: SOURCE/tokenizer.model)")
    sub.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                     help="dtype of the saved params (training keeps fp32 params)")
  for name, what in (("gguf-to-orbax", "our params checkpoint"), ("gguf-to-hf", "HF_DIR")):
    sub = commands.add_parser(name, help=f"MODEL.gguf (LLaMA architecture) -> {what}")
    sub.add_argument("source", metavar="MODEL.gguf")
    sub.add_argument("out", metavar="OUT_DIR")
    sub.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                     help="dtype the weights are dequantised to")
    if name == "gguf-to-hf":
      sub.add_argument("--shard-gb", type=float, default=5.0, help="safetensors shard size")
  sub = commands.add_parser("orbax-to-hf", help="our checkpoint -> HF_DIR")
  sub.add_argument("source", metavar="CKPT_DIR")
  sub.add_argument("out", metavar="OUT_DIR")
  sub.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
  sub.add_argument("--dtype", choices=sorted(_DTYPES), help="default: as stored")
  sub.add_argument("--shard-gb", type=float, default=5.0, help="safetensors shard size")
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  quiet_logs()
  started = time.perf_counter()
  try:
    if args.command == "orbax-to-hf":
      files = export_hf(args.source, args.out, step=args.step, dtype=args.dtype,
                        shard_gb=args.shard_gb)
      what = f"{len(files)} safetensors file(s)"
    elif args.command == "gguf-to-hf":
      files = gguf_to_hf(args.source, args.out, dtype=args.dtype, shard_gb=args.shard_gb)
      what = f"{len(files)} safetensors file(s) + tokenizer.json"
    elif args.command == "gguf-to-orbax":
      fields = import_gguf(args.source, args.out, param_dtype=args.dtype)
      what = (f"{fields['n_layers']} layers, d_model {fields['d_model']}, vocabulary "
              f"{fields['vocab_size']}, tokenizer.json, on {jax.device_count()} device(s)")
    else:
      opener = hf.HfSource if args.command == "hf-to-orbax" else meta.MetaSource
      fields = import_model(opener(args.source), args.out, tokenizer=args.tokenizer,
                            param_dtype=args.dtype)
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
