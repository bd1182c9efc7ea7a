"""`python -m lima_jax.train`: LIMA supervised fine-tuning from a config file.

  python -m lima_jax.train                                   # configs/toy.py on 8 fake CPU devices
  python -m lima_jax.train --config=configs/lima_65b.py --workdir=gs://bucket/run1 \
      --config.data.train_path=gs://bucket/lima/train.jsonl

config -> tokenizer and data -> mesh -> sharded state (fresh or resumed) -> steps, with a
checkpoint at the end of every epoch. Rerunning the same command resumes from the latest
checkpoint; the data order and dropout follow from the step, so the result is the same.
"""

import dataclasses
import importlib.util
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from lima_jax import checkpoint, config, data, generate, lora, loop, optim, sharding
from lima_jax.cli import fail, quiet_logs, use_compile_cache, use_fake_cpu_devices
from lima_jax.config_cli import default_workdir, load_config, parse_flags, pinned_model_keys
from lima_jax.errors import LimaError
from lima_jax.metrics import RunReporter
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer
from lima_jax.trained import Trained, check_resumable
from lima_jax.weights import layout
from lima_jax.workdir_lock import WorkdirLock

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs); "
                               "local or gs://. Default: config.workdir or workdir/<config name>.")
_MULTIHOST = flags.DEFINE_boolean(
    "multihost", None, "Join the other processes of a multi-host run (jax.distributed). "
    "Default: when JAX_COORDINATOR_ADDRESS is set or on a Cloud TPU VM.")
for _name in ("config", "show_config"):  # lima_jax.config_cli's flags, listed by --help
  flags.declare_key_flag(_name)


# The model's shape: with init_from these come from the weights, not from the config.
SHAPE_KEYS = tuple(k for k in layout.MODEL_KEYS if k != "vocab_size")


def model_config(model_section, vocab_size: int, source: dict | None = None, *,
                 pinned=(), where: str = "init_from", lora_section=None) -> LlamaConfig:
  """The model of the config's `model` section with the tokenizer's vocabulary (EOT included)
  and the adapters of its `lora` section (none without one).

  With `source` (the fields of init_from's weights) the SHAPE_KEYS come from there and the
  config's values yield, except those in `pinned` (given on the command line): one that
  disagrees with the source raises LimaError naming every such key.
  """
  lora_fields = lora.fields(lora_section) if lora_section is not None else {}
  fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {"vocab_size", *lora.FIELDS}
  values = dict({k: model_section[k] for k in fields}, **lora_fields)
  if source is not None:
    wrong = [k for k in SHAPE_KEYS if k in pinned and model_section[k] != source[k]]
    if wrong:
      raise LimaError(
          f"{', '.join(f'--config.model.{k}={model_section[k]!r}' for k in wrong)}: "
          f"{where} holds {', '.join(f'{k}={source[k]!r}' for k in wrong)}; drop the "
          f"flag{'s' if len(wrong) > 1 else ''} (with init_from the model's shape comes from "
          "its weights)")
    values.update({k: source[k] for k in SHAPE_KEYS})
  return LlamaConfig(vocab_size=vocab_size, **values)


def init_source(cfg):
  """init_from's weights opened (an HF, Meta or lima_jax source: fields, extras, tensors), their
  shapes checked and none of them read; None without init_from."""
  if not cfg.init_from:
    return None
  if not epath.Path(cfg.init_from).exists():
    raise LimaError(f"init_from: {cfg.init_from}: no such directory")
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  return pretrained.open_source(cfg.init_from)


def step_token_counts(examples, plan, steps):
  """Per step, the token count of each of its examples (what packing needs)."""
  return [[len(examples[i].ids) for i in plan.example_ids(s)] for s in steps]


def step_layout(cfg, lengths_per_step, mesh, rows_per_step: int = 0) -> data.StepLayout:
  """The static batch layout of every step: `rows_per_step` rows (0: the fewest that fit every
  step in `lengths_per_step`), in micro-batches of train.micro_batch_rows rows that split evenly
  over the mesh's batch shards."""
  rows = rows_per_step or data.rows_needed(lengths_per_step, cfg.data.max_length)
  ways = sharding.batch_ways(mesh)
  micro = cfg.train.micro_batch_rows
  if micro == -1:  # the whole step at once
    micro = -(-rows // ways) * ways
  elif micro == 0:
    micro = ways
  elif micro % ways:
    raise LimaError(f"config train.micro_batch_rows: {micro} rows do not split over the mesh's "
                    f"{ways} batch shards (mesh.data x mesh.fsdp); use a multiple of {ways}")
  return data.StepLayout.holding(rows, micro, cfg.data.max_length)


class DevSet:
  """Dev loss and perplexity over every dev example, packed like training steps."""

  def __init__(self, examples, cfg, mesh):
    batch_size = cfg.train.batch_size
    self.steps = [list(chunk) for chunk in np.array_split(
        np.arange(len(examples)), max(1, -(-len(examples) // batch_size)))]
    self.layout = step_layout(cfg, [[len(examples[i].ids) for i in ids] for ids in self.steps],
                              mesh)
    self.examples = examples

  def evaluate(self, trainer, params) -> dict:
    loss_sum = tokens = 0.0
    for ids in self.steps:
      batch = self.layout.pack([self.examples[i] for i in ids])
      out = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch)))
      loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}


@dataclasses.dataclass
class Setup:
  """Everything a run needs before its first step, built in an order that touches nothing on
  disk until the config, tokenizer, data and mesh are known to be valid."""
  tokenizer: data.ChatTokenizer
  examples: list
  dev: DevSet | None
  plan: data.EpochPlan
  total_steps: int
  layout: data.StepLayout
  trainer: Trainer
  meta: dict
  generations: generate.EpochGenerations  # dev generations of eval.generate_epochs


def prepare(cfg, workdir: str) -> Setup:
  config.validate(cfg)
  if cfg.mesh.cpu_devices:
    use_fake_cpu_devices(cfg.mesh.cpu_devices)
  use_compile_cache(cfg.train.compile_cache_dir)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  # The weights' shape and vocabulary first: nothing is written for a source that cannot train.
  source = init_source(cfg)
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  tokenizer = pretrained.run_tokenizer(cfg.init_from, cfg.data.tokenizer_path,
                                       eot_token=cfg.data.eot_token,
                                       chat_format=cfg.data.chat_format, source=source)
  model_cfg = model_config(cfg.model, tokenizer.vocab_size, source and source.fields,
                           pinned=pinned_model_keys(), where=f"init_from {cfg.init_from}",
                           lora_section=cfg.lora)
  load = dict(max_length=cfg.data.max_length, train_on_prompt=cfg.data.train_on_prompt,
              data_dir=data.prepared_dir(workdir, cfg.data.cache_dir))
  examples, dev_examples = process_0_first(lambda: (
      data.load_examples(cfg.data.train_path, tokenizer, what="data.train_path", **load),
      data.load_examples(cfg.data.dev_path, tokenizer, what="data.dev_path", **load)
      if cfg.data.dev_path else []))

  plan = data.EpochPlan(len(examples), cfg.train.batch_size, cfg.seed)
  total_steps = plan.steps_per_epoch * cfg.train.epochs
  optimizer, schedule = optim.make_optimizer(cfg.optimizer, total_steps)
  trained = Trained.of_run(model_cfg, tokenizer.meta())
  trainer = Trainer(model_cfg, optimizer, schedule, mesh, cfg.seed,
                    loss_chunk_tokens=cfg.train.loss_chunk_tokens, trained=trained)
  recorded = cfg.to_dict()
  recorded["model"].update({k: getattr(model_cfg, k) for k in SHAPE_KEYS})  # what ran
  meta = {"config": recorded, "model": dataclasses.asdict(model_cfg),
          "tokenizer_sha256": tokenizer.sha256, "tokenizer": tokenizer.meta(),
          "steps_per_epoch": plan.steps_per_epoch, "total_steps": total_steps,
          "hf": source.extras if source else {}, **trained.record()}
  if model_cfg.lora_rank:  # where the frozen base comes from again: checkpoints hold adapters
    meta[lora.BASE] = lora.base_record(cfg)
  return Setup(
      tokenizer=tokenizer, examples=examples, plan=plan, total_steps=total_steps,
      dev=DevSet(dev_examples, cfg, mesh) if dev_examples else None,
      layout=step_layout(cfg, step_token_counts(examples, plan, range(total_steps)), mesh,
                         cfg.data.rows_per_step),
      trainer=trainer, meta=meta,
      generations=generate.EpochGenerations(cfg, trainer, tokenizer, workdir, meta))


def process_0_first(load):
  """load() on process 0 (which builds the TFDS copy in the workdir), then on the others once it
  is there: builders racing on one directory would corrupt it. One process: just load()."""
  if jax.process_count() == 1:
    return load()
  result = error = None
  if jax.process_index() == 0:
    try:
      result = load()
    except LimaError as e:  # reach the barrier anyway; the others meet the same error
      error = e
  multihost_utils.sync_global_devices("lima_jax: training data prepared")
  if error is not None:
    raise error
  return result if jax.process_index() == 0 else load()


def init_distributed(multihost: bool | None) -> None:
  """jax.distributed.initialize() for a multi-process run, before JAX starts its backends.

  None decides from the environment: a coordinator address given, or a Cloud TPU VM (the TPU
  build of jax brings libtpu), where JAX finds the workers itself; one worker is fine too.
  """
  explicit = multihost or "JAX_COORDINATOR_ADDRESS" in os.environ
  if multihost is False or not (explicit or importlib.util.find_spec("libtpu")):
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # no cluster found: JAX raises before contacting anyone
    if explicit:
      raise LimaError(f"--multihost: JAX found no cluster to join ({e}); it finds one by itself "
                      "on Cloud TPU VMs, Slurm and Open MPI") from None


def run(cfg, workdir: str) -> dict:
  """Trains as `cfg` says; returns the last step's metrics (empty if there was nothing to do).

  Raises LimaError for bad input or a workdir in use by another run.
  """
  started = time.perf_counter()
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)  # Orbax refuses relative checkpoint paths
  s = prepare(cfg, workdir)
  with WorkdirLock(workdir):  # after prepare: taking it needs to know which process is 0
    return _train(s, cfg, workdir, started)


def _train(s: Setup, cfg, workdir: str, started: float) -> dict:
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=cfg.checkpoint.max_to_keep,
                                 async_save=cfg.checkpoint.async_save)
  try:
    state, start, epoch_loss = _restore_or_init(ckpts, s.trainer, cfg, s.meta, workdir)
  except BaseException:
    ckpts.close()
    raise
  if start >= s.total_steps:
    print(f"{workdir}: training already complete ({s.total_steps} steps); nothing to do.")
    ckpts.close()
    return {}
  end = min(s.total_steps, cfg.train.stop_after_steps or s.total_steps)
  trains = (f" ({s.trainer.num_trainable / 1e6:.2f}M in {s.trainer.trained.describe()}, rank "
            f"{s.trainer.model_cfg.lora_rank})" if s.trainer.uses_lora else "")
  print(f"lima_jax: {s.trainer.num_params / 1e6:.2f}M params{trains}, {len(s.examples)} examples, "
        f"{s.plan.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs = {s.total_steps} "
        f"steps, up to {s.layout.micro_batches} x {s.layout.rows} packed rows x "
        f"{cfg.data.max_length} per step, mesh "
        f"{dict(s.trainer.mesh.shape)}, {f'resuming at step {start}' if start else 'fresh start'}"
        f"; set-up {time.perf_counter() - started:.1f}s", flush=True)
  reporter = RunReporter(workdir, total_steps=s.total_steps, initial_step=start)
  try:
    outcome = loop.train_steps(s, cfg, state, range(start, end), ckpts, reporter, epoch_loss)
  finally:
    ckpts.close()
    s.generations.close()
    reporter.close()
  done = outcome.last.get("step", start)
  print(f"lima_jax: stopped at step {done}/{s.total_steps}"
        f"{f' ({outcome.stopped_by})' if outcome.stopped_by else ''}; checkpoints in "
        f"{ckpts.directory}", flush=True)
  return outcome.last


def _restore_or_init(ckpts, trainer, cfg, meta, workdir):
  """(state, step, the epoch's loss sums so far) from the newest readable checkpoint, or a fresh
  state at step 0."""
  def same_run(saved):
    check_resumable(saved, meta, workdir)
    _check_same_chat_tokens(saved.get("tokenizer") or {}, meta["tokenizer"], workdir)
    checkpoint.check_same_model(saved, meta["model"], workdir)
    checkpoint.check_same_schedule(saved, meta, workdir)
    if saved.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
      raise LimaError(f"data.tokenizer_path: {cfg.data.tokenizer_path} differs from the "
                      f"tokenizer the checkpoints in {workdir} were trained with")

  restored = ckpts.restore_newest(trainer.checkpointed(trainer.abstract_state),
                                  check_meta=same_run)
  if restored is not None:
    state, step, saved = restored
    if trainer.uses_lora:  # the checkpoint holds the adapters; the base is loaded again
      state = trainer.with_base(state, _fresh_state(trainer, cfg, meta))
    return state, step, tuple(saved.get(loop.EPOCH_LOSS, (0.0, 0.0)))
  if ckpts.all_steps():
    raise LimaError(f"{ckpts.directory}: no checkpoint there reads back whole; move the "
                    "directory away to start afresh")
  return _fresh_state(trainer, cfg, meta), 0, (0.0, 0.0)


def _fresh_state(trainer, cfg, meta):
  """Step 0: init_from's weights (HF, Meta or our import) with a fresh optimizer, or a random
  init from the seed."""
  if cfg.init_from:
    from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
    return pretrained.init_state(trainer, cfg.init_from, meta["tokenizer"])
  return trainer.init(cfg.seed)


def _check_same_chat_tokens(saved: dict, current: dict, workdir: str) -> None:
  """A resume keeps the EOT and chat format the checkpoints learned: a run switching them midway
  would train on two formats. `saved` is the checkpoint's tokenizer record (empty for runs older
  than the record), `current` this run's `ChatTokenizer.meta()`."""
  changed = [(key, label, saved[name], current[name]) for key, label, name in (
      ("data.eot_token", "EOT id", "eot_id"), ("data.chat_format", "chat format", "chat_format"))
      if name in saved and saved[name] != current[name]]
  if changed:
    raise LimaError(
        f"{', '.join(c[0] for c in changed)}: the checkpoints in {workdir} were trained with "
        f"{', '.join(f'{label} {old!r}' for _, label, old, _ in changed)}, this config gives "
        f"{', '.join(f'{label} {new!r}' for _, label, _, new in changed)}; rerun with the "
        f"workdir's values, or train in a fresh --workdir with --config.init_from={workdir}")


def main(argv):
  if len(argv) > 1:
    fail(f"command line: unexpected arguments: {' '.join(argv[1:])} (flags look like --x=y)")
  quiet_logs()  # library INFO logs would drown the progress bar
  cfg = load_config()
  workdir = _WORKDIR.value or cfg.workdir or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    init_distributed(_MULTIHOST.value)
    run(cfg, workdir)
  except LimaError as e:
    fail(str(e))
  except KeyboardInterrupt:  # Ctrl-C outside the steps (set-up, compiling): one line
    print("lima_jax: interrupted; rerun the same command to start or resume", file=sys.stderr,
          flush=True)
    sys.exit(130)  # the shell's status for SIGINT


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
