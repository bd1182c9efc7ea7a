"""What a server or a chat talks with: params, tokenizer, context and default decoding, loaded
from a run (as `python -m lima_jax.generate` loads them) or from anything `init_from` accepts."""

import dataclasses
import os

import optax

from lima_jax import config, run_files, sharding
from lima_jax.data import ChatTokenizer
from lima_jax.errors import LimaError
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer

DEFAULT_CONTEXT = 2048  # --model sources record no training length: LIMA's max_length


@dataclasses.dataclass
class Loaded:
  """A model ready to decode: `trainer` (graphdef, model config, mesh), `params` on its mesh,
  `tokenizer` (the chat format and EOT it was trained with), `context` (prompt + answer tokens
  at most), `generate` (the generate.* settings that fill a request's missing fields), `name`
  (what /v1/models lists) and `where` (a line for the log)."""
  trainer: Trainer
  params: dict
  tokenizer: ChatTokenizer
  context: int
  generate: dict
  name: str
  where: str


def add_source_flags(parser) -> None:
  """--workdir/--epoch/--step or --model, and what a --model source cannot say itself."""
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--workdir", help="a training run: its newest params, or --epoch/--step")
  which.add_argument("--model", help="a model directory, anything init_from accepts: HF "
                                     "safetensors, Meta .pth, a GGUF import, our params export")
  kept = parser.add_mutually_exclusive_group()
  kept.add_argument("--epoch", type=int, help="with --workdir: the params kept at this epoch")
  kept.add_argument("--step", type=int, help="with --workdir: the checkpoint of this step")
  parser.add_argument("--chat_format", choices=("lima", "template"),
                      help="with --model: how messages become ids (default: as the source "
                           "records, else lima)")
  parser.add_argument("--eot_token", default="",
                      help="with --model: an existing token that ends each turn (e.g. "
                           "<|im_end|>); default: as the source records, else a new EOT row")
  parser.add_argument("--context", type=int,
                      help="prompt + answer tokens at most (default: the run's data.max_length; "
                           f"{DEFAULT_CONTEXT} with --model)")


def load(args) -> Loaded:
  """The model the flags name. Raises LimaError (one line) for a missing run, epoch or source."""
  if args.model:
    if args.epoch is not None or args.step is not None:
      raise LimaError("--epoch/--step: only with --workdir")
    loaded = _from_source(args.model, args.chat_format, args.eot_token)
  else:
    if args.chat_format or args.eot_token:
      raise LimaError("--chat_format/--eot_token: only with --model (a run keeps its own)")
    loaded = _from_run(args.workdir, args.epoch, args.step)
  if args.context is not None:
    if args.context < 2:
      raise LimaError(f"--context={args.context}: must be at least 2")
    loaded.context = args.context
  return loaded


def _generate_section(run_cfg: dict) -> dict:
  return dict(config.base_config().generate.to_dict(), **run_cfg.get("generate", {}))


def _from_run(workdir: str, epoch, step) -> Loaded:
  from lima_jax import generate  # pylint: disable=import-outside-toplevel
  kept = run_files.locate(workdir, epoch=epoch, step=step)
  source, tokenizer = generate.open_kept(kept)
  trainer, params = generate.restore_kept(kept, source)
  run_cfg = kept.meta["config"]
  where = f"epoch {kept.epoch}, step {kept.step}" if kept.epoch is not None else f"step {kept.step}"
  return Loaded(trainer, params, tokenizer, run_cfg["data"]["max_length"],
                _generate_section(run_cfg), os.path.basename(os.path.normpath(workdir)),
                f"{workdir} ({where})")


def _from_source(path: str, chat_format: str | None, eot_token: str) -> Loaded:
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  source = pretrained.open_source(path)
  ours = isinstance(source, pretrained.OrbaxParams)
  tokenizer = pretrained.run_tokenizer(path, "", eot_token=eot_token,
                                       chat_format=chat_format or ("" if ours else "lima"),
                                       source=source)
  fields = {k: source.fields[k] for k in source.fields
            if k in {f.name for f in dataclasses.fields(LlamaConfig)}}
  model_cfg = LlamaConfig(**dict(fields, vocab_size=tokenizer.vocab_size))
  trainer = Trainer(model_cfg, optax.identity(), optax.constant_schedule(0.0),
                    sharding.make_mesh(1, -1, 1), 0)
  if trainer.uses_lora:
    raise LimaError(f"--model: {path} holds LoRA adapters; serve their run with --workdir")
  params = pretrained.load_params(path, trainer, tokenizer.meta())
  return Loaded(trainer, params, tokenizer, DEFAULT_CONTEXT, _generate_section({}),
                os.path.basename(os.path.normpath(path)), path)
