"""`python -m lima_jax.generate`: answers to a prompts file from a run's params, decoded as in
the paper (nucleus 0.9, temperature 0.7, repetition penalty 1.2 on the generated tokens, stop
at EOT or at one of the model's own end ids: `ChatTokenizer.stop_ids`).

  python -m lima_jax.generate --workdir=workdir/toy --epoch=5 \
      --prompts=lima_jax/sample_data/dev.jsonl --out=answers.jsonl

Params come from `--epoch` (kept for selection), `--step` (a checkpoint) or the latest
checkpoint; the decoding defaults are the run's `generate.*` config. Also here: the dev
generations a training run writes at the end of each epoch of `eval.generate_epochs`.
"""

import argparse
import time

import jax
import ml_collections
import optax
import tqdm
from absl import logging

from lima_jax import config, run_files, sharding
from lima_jax.cli import ArgumentParser, fail, quiet_logs, summary
from lima_jax.data import ChatTokenizer, prepared_dir
from lima_jax.decoding import Decoding, Generator
from lima_jax.errors import LimaError
from lima_jax.model import LlamaConfig
from lima_jax.prompts import generation_records, load_prompts, write_jsonl
from lima_jax.train_state import Trainer
from lima_jax.trained import Trained


class EpochGenerations:
  """At the end of each epoch of eval.generate_epochs: the dev prompts' generations, written to
  <workdir>/generations/epoch_<E>.jsonl, and the epoch's params kept for selection."""

  def __init__(self, cfg, trainer: Trainer, tokenizer: ChatTokenizer, workdir: str, meta: dict):
    self.epochs = set(cfg.eval.generate_epochs)
    self.workdir, self.meta, self.tokenizer = workdir, meta, tokenizer
    self.context, self.max_new = cfg.data.max_length, cfg.eval.max_new_tokens
    self.decoding = Decoding.from_config(cfg.generate)
    self.prompts = []
    if cfg.data.dev_path and self.epochs:
      self.prompts = load_prompts(cfg.data.dev_path, tokenizer, context=self.context,
                                  data_dir=prepared_dir(workdir, cfg.data.cache_dir),
                                  what="data.dev_path",
                                  skip_long=True)
    self.generator = Generator(trainer, tokenizer.stop_ids, cfg.generate.batch_size)
    self._trainable = trainer.trainable  # with LoRA only the adapters are exported
    # Full checkpoints are not kept per epoch (nor always written at one), so each selection
    # epoch's params are exported on their own: a quarter of the full state's bytes in fp32.
    self._params = (run_files.EpochParamsWriter(workdir, async_save=cfg.checkpoint.async_save,
                                                dtype=cfg.checkpoint.export_dtype)
                    if self.epochs else None)

  def at_epoch_end(self, epoch: int, step: int, params) -> None:
    if epoch not in self.epochs:
      return
    if self._params is not None:
      self._params.save(epoch, self._trainable(params), dict(self.meta, step=step, epoch=epoch))
    if not self.prompts:
      return
    started = time.perf_counter()
    ids = self.generator.generate(params, [p.ids for p in self.prompts], max_new=self.max_new,
                                  context=self.context, decoding=self.decoding)
    if jax.process_index() == 0:
      path = run_files.generations_path(self.workdir, epoch)
      write_jsonl(path, generation_records(self.prompts, ids, self.tokenizer))
      tqdm.tqdm.write(f"epoch {epoch}: {len(ids)} dev generations in {path} "
                      f"({time.perf_counter() - started:.1f}s)")

  def writing(self) -> bool:
    """Whether an epoch's params export is still being written."""
    return self._params is not None and self._params.writing()

  def close(self) -> None:
    if self._params is not None:
      self._params.close()


def _mesh(mesh_cfg: dict):
  """The run's mesh when this machine has its devices; else every device on 'fsdp'."""
  try:
    return sharding.make_mesh(mesh_cfg["data"], mesh_cfg["fsdp"], mesh_cfg["tensor"])
  except LimaError:
    logging.warning("the run's mesh %s does not fit the %d devices here; using them all as fsdp",
                    {k: mesh_cfg[k] for k in sharding.MESH_AXES}, jax.device_count())
    return sharding.make_mesh(1, -1, 1)


def open_kept(kept: run_files.Kept):
  """(the params' Orbax source, their tokenizer): cheap, nothing restored yet."""
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  source = pretrained.OrbaxParams(kept.directory, kept.number)
  tokenizer = source.tokenizer()
  if tokenizer is None:
    raise LimaError(f"{kept.directory}: the tokenizer of checkpoint {kept.number} is missing "
                    f"({source.tokenizer_path})")
  return source, tokenizer


def restore_kept(kept: run_files.Kept, source, *, base: bool = True):
  """(trainer, params on its mesh) for params found by `run_files.locate`; a LoRA run's
  trained part (adapters, token rows) joined to its base, loaded again from where the run loaded
  it (base=False: the trained part alone). Raises LimaError when that base is gone."""
  # The kernel that trained the model may not run here (splash on a TPU pod, generation on a GPU
  # or CPU): generation uses this machine's own.
  model_cfg = LlamaConfig(**dict(kept.meta["model"], attention="auto"))
  trainer = Trainer(model_cfg, optax.identity(),
                    optax.constant_schedule(0.0), _mesh(kept.meta["config"]["mesh"]), 0,
                    trained=Trained.recorded(kept.meta))
  abstract = trainer.abstract_state["params"]
  if not trainer.uses_lora:
    return trainer, source.restore(abstract)
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  trained = source.restore(trainer.trainable(abstract))
  if not base:
    return trainer, trained
  return trainer, trainer.joined(pretrained.lora_base(kept.meta, trainer), trained)


# Each flag's type and meaning; its default is the run's generate.<flag>.
_DECODING_FLAGS = {
    "temperature": (float, "sampling temperature (the paper: 0.7)"),
    "top_p": (float, "nucleus sampling: draw from the likeliest tokens whose probabilities "
                     "first reach this mass (the paper: 0.9)"),
    "repetition_penalty": (float, "CTRL's penalty on tokens already generated: their positive "
                                  "logits are divided by it, negative ones multiplied "
                                  "(the paper: 1.2; 1.0 = none)"),
    "max_tokens": (int, "new tokens per answer at most; prompt and answer also stay within the "
                        "run's data.max_length"),
    "seed": (int, "sampling seed; each prompt draws from its own key, so its answer does not "
                  "depend on --batch_size"),
    "batch_size": (int, "prompts decoded at once, rounded up to the mesh's batch shards"),
    "penalize_prompt": (bool, "apply the repetition penalty to the prompt's tokens as well, as "
                              "transformers does (the paper penalises previously generated "
                              "tokens only)"),
}


def _parser() -> ArgumentParser:
  parser = ArgumentParser(prog="python -m lima_jax.generate", description=summary(__doc__))
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--epoch", type=int, help="params kept at the end of this epoch")
  which.add_argument("--step", type=int, help="the checkpoint of this step")
  parser.add_argument("--prompts", required=True, help="JSONL in the GAIR/lima format")
  parser.add_argument("--out", required=True, help="JSONL: prompt, generation, source per line")
  for name, (kind, meaning) in _DECODING_FLAGS.items():
    kwargs = (dict(action=argparse.BooleanOptionalAction) if kind is bool else
              dict(type=kind, metavar=kind.__name__.upper()))
    parser.add_argument(f"--{name}", help=f"{meaning}. Default: the run's generate.{name}",
                        **kwargs)
  parser.add_argument("--greedy", action="store_true",
                      help="arg max (after the repetition penalty) instead of sampling")
  return parser


def decoding_settings(run_cfg: dict, args) -> dict:
  """The run's generate.* config with the flags given on top, checked."""
  section = dict(config.base_config().generate.to_dict(), **run_cfg.get("generate", {}))
  section.update({k: getattr(args, k) for k in _DECODING_FLAGS if getattr(args, k) is not None})
  section["greedy"] = section["greedy"] or args.greedy
  for key, message in config.generate_problems(ml_collections.ConfigDict(section)):
    raise LimaError(f"--{key}: {message}")
  return section


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  quiet_logs()
  try:
    _generate(args)
  except LimaError as e:
    fail(str(e))


def _generate(args) -> None:
  started = time.perf_counter()
  kept = run_files.locate(args.workdir, epoch=args.epoch, step=args.step)
  run_cfg = kept.meta["config"]
  section = decoding_settings(run_cfg, args)
  source, tokenizer = open_kept(kept)
  context = run_cfg["data"]["max_length"]
  # The prompts are checked before the params are restored: that can take minutes.
  prompts = load_prompts(args.prompts, tokenizer, context=context, what="--prompts",
                         data_dir=prepared_dir(args.workdir))
  trainer, params = restore_kept(kept, source)
  generator = Generator(trainer, tokenizer.stop_ids, section["batch_size"])
  with tqdm.tqdm(total=len(prompts), unit="prompt", desc="generate", dynamic_ncols=True) as bar:
    ids = generator.generate(params, [p.ids for p in prompts], max_new=section["max_tokens"],
                             context=context, decoding=Decoding.from_config(section),
                             on_batch=bar.update)
  if jax.process_index() == 0:
    write_jsonl(args.out, generation_records(prompts, ids, tokenizer))
  where = f"epoch {kept.epoch}, step {kept.step}" if kept.epoch else f"step {kept.step}"
  print(f"generate: {len(prompts)} prompts -> {args.out} ({where}); "
        f"{sum(len(i) for i in ids)} tokens, {time.perf_counter() - started:.1f}s in all")


if __name__ == "__main__":
  main()
