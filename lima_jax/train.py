"""`python -m lima_jax.train`: LIMA supervised fine-tuning from a config file.

  python -m lima_jax.train                                   # configs/toy.py on 8 fake CPU devices
  python -m lima_jax.train --config=configs/lima_65b.py --workdir=gs://bucket/run1 \
      --config.data.train_path=gs://bucket/lima/train.jsonl

config -> tokenizer and data -> mesh -> sharded state (fresh or resumed) -> steps, with a
checkpoint at the end of every epoch. Rerunning the same command resumes from the latest
checkpoint; the data order and dropout follow from the step, so the result is the same.
"""

import dataclasses
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from lima_jax import checkpoint, config, data, optim, sharding
from lima_jax.errors import LimaError
from lima_jax.metrics import RunReporter
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "toy.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs); "
                               "local or gs://. Default: config.workdir or workdir/<config name>.")


def model_config(model_section, vocab_size: int) -> LlamaConfig:
  fields = {f.name for f in dataclasses.fields(LlamaConfig)} - {"vocab_size"}
  return LlamaConfig(vocab_size=vocab_size, **{k: model_section[k] for k in fields})


def step_token_counts(examples, plan, steps):
  """Per step, the token count of each of its examples (what packing needs)."""
  return [[len(examples[i].ids) for i in plan.example_ids(s)] for s in steps]


def packed_rows(cfg, examples, plan, total_steps, mesh) -> int:
  """The static row count of every step: the configured one, or the fewest that fit all steps,
  rounded up so the rows split evenly over the mesh's batch axes."""
  rows = cfg.data.rows_per_step or data.rows_needed(
      step_token_counts(examples, plan, range(total_steps)), cfg.data.max_length)
  ways = sharding.batch_ways(mesh)
  return -(-rows // ways) * ways


class DevSet:
  """Dev loss and perplexity over every dev example, packed like training steps."""

  def __init__(self, examples, batch_size, length, mesh):
    self.steps = [list(chunk) for chunk in np.array_split(
        np.arange(len(examples)), max(1, -(-len(examples) // batch_size)))]
    lengths = [[len(examples[i].ids) for i in ids] for ids in self.steps]
    ways = sharding.batch_ways(mesh)
    self.rows = -(-data.rows_needed(lengths, length) // ways) * ways
    self.examples, self.length = examples, length

  def evaluate(self, trainer, params) -> dict:
    loss_sum = tokens = 0.0
    for ids in self.steps:
      batch = data.pack_step([self.examples[i] for i in ids], self.rows, self.length)
      out = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch)))
      loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}


def run(cfg, workdir: str) -> dict:
  """Trains as `cfg` says; returns the last step's metrics (empty if there was nothing to do)."""
  config.validate(cfg)
  if cfg.mesh.cpu_devices:
    jax.config.update("jax_num_cpu_devices", cfg.mesh.cpu_devices)
  started = time.perf_counter()

  tokenizer = data.ChatTokenizer(cfg.data.tokenizer_path)
  tfds_dir = os.path.join(workdir, "tfds")
  load = dict(max_length=cfg.data.max_length, train_on_prompt=cfg.data.train_on_prompt,
              data_dir=tfds_dir)
  examples = data.load_examples(cfg.data.train_path, tokenizer, what="data.train_path", **load)
  dev_examples = (data.load_examples(cfg.data.dev_path, tokenizer, what="data.dev_path", **load)
                  if cfg.data.dev_path else [])

  plan = data.EpochPlan(len(examples), cfg.train.batch_size, cfg.seed)
  total_steps = plan.steps_per_epoch * cfg.train.epochs
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  rows = packed_rows(cfg, examples, plan, total_steps, mesh)
  model_cfg = model_config(cfg.model, tokenizer.vocab_size)
  optimizer, schedule = optim.make_optimizer(cfg.optimizer, total_steps)
  trainer = Trainer(model_cfg, optimizer, schedule, mesh, cfg.seed)
  dev = DevSet(dev_examples, cfg.train.batch_size, cfg.data.max_length, mesh) if dev_examples else None

  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=cfg.checkpoint.max_to_keep,
                                 async_save=cfg.checkpoint.async_save)
  meta = {"config": cfg.to_dict(), "model": dataclasses.asdict(model_cfg),
          "tokenizer_sha256": tokenizer.sha256, "steps_per_epoch": plan.steps_per_epoch,
          "total_steps": total_steps}
  state, start = _restore_or_init(ckpts, trainer, cfg, meta, workdir)
  if start >= total_steps:
    print(f"{workdir}: training already complete ({total_steps} steps); nothing to do.")
    ckpts.close()
    return {}
  end = min(total_steps, cfg.train.stop_after_steps or total_steps)

  print(f"lima_jax: {trainer.num_params / 1e6:.2f}M params, {len(examples)} examples, "
        f"{plan.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs = {total_steps} steps, "
        f"{rows} packed rows x {cfg.data.max_length} per step, mesh {dict(mesh.shape)}, "
        f"{'resuming at step ' + str(start) if start else 'fresh start'}; "
        f"set-up {time.perf_counter() - started:.1f}s", flush=True)
  reporter = RunReporter(workdir, total_steps=total_steps, initial_step=start)
  record = {}
  try:
    for step in range(start, end):
      epoch = plan.epoch_of(step)
      batch = data.pack_step([examples[i] for i in plan.example_ids(step)], rows,
                             cfg.data.max_length)
      t0 = time.perf_counter()
      state, metrics = trainer.train_step(state, trainer.put_batch(batch))
      metrics = jax.device_get(metrics)
      step_time = time.perf_counter() - t0
      tokens = int(metrics["tokens"])
      record = {"step": step + 1, "epoch": epoch + 1, "loss": float(metrics["loss"]),
                "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                "tokens": tokens, "step_time": step_time, "tokens_per_s": tokens / step_time}
      reporter.step(record)
      epoch_done = (step + 1) % plan.steps_per_epoch == 0
      if epoch_done and dev is not None:
        dev_metrics = dev.evaluate(trainer, state["params"])
        reporter.scalars("dev", dev_metrics, step + 1)
        reporter.message(f"epoch {epoch + 1}: train loss {record['loss']:.4f}, dev loss "
                         f"{dev_metrics['loss']:.4f}, dev perplexity {dev_metrics['perplexity']:.2f}")
      if epoch_done or step + 1 == end:
        ckpts.save(step + 1, state, dict(meta, step=step + 1, epoch=(step + 1) / plan.steps_per_epoch))
  finally:
    ckpts.close()
    reporter.close()
  print(f"lima_jax: stopped at step {end}/{total_steps}; checkpoints in {ckpts.directory}",
        flush=True)
  return record


def _restore_or_init(ckpts, trainer, cfg, meta, workdir):
  latest = ckpts.latest_step()
  if latest is None:
    return trainer.init(cfg.seed), 0
  saved = ckpts.read_meta(latest)
  checkpoint.check_same_model(saved, meta["model"], workdir)
  if saved.get("tokenizer_sha256") != meta["tokenizer_sha256"]:
    raise LimaError(f"data.tokenizer_path: {cfg.data.tokenizer_path} differs from the tokenizer "
                    f"the checkpoints in {workdir} were trained with")
  return ckpts.restore(latest, trainer.abstract_state), latest


def default_workdir(config_path: str) -> str:
  return os.path.join("workdir", os.path.splitext(os.path.basename(config_path))[0])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not any(arg.startswith(("--verbosity", "-v")) for arg in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)  # library INFO logs would drown the progress bar
  cfg = _CONFIG.value
  workdir = _WORKDIR.value or cfg.workdir or default_workdir(
      config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    run(cfg, workdir)
  except LimaError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
