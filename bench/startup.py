"""Where the default run's time goes: `python -m lima_jax.train` with configs/toy.py, shortened.

The worker calls the trainer's own functions in the order `lima_jax.train.run` does and times
each phase from outside; the only difference is that the step is compiled ahead of time
(`lower().compile()`) so compilation is not hidden inside the first step. The persistent
compilation cache starts empty, as on a first run.

Phases: imports; set-up (config, tokenizer, TFDS build and tokenization of the data, mesh,
Trainer: `lima_jax.train.prepare`); state init; compile; steps (the loop's own
`pipelined_steps`: packing and transfer overlap the steps, which are held only at epoch ends);
epoch ends (dev loss and dev generations, as the toy config asks every epoch); checkpoint
writes (what the step loop waits for: the saves' blocking part, as `checkpoint.epoch_state`
decides them, plus the final wait).
"""

import os
import tempfile
import time


def measure(epochs: int) -> dict:
  seconds = {}
  started = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from lima_jax import checkpoint, config, config_cli, loop  # pylint: disable=import-outside-toplevel
  from lima_jax import train  # pylint: disable=import-outside-toplevel
  from lima_jax.cli import quiet_logs  # pylint: disable=import-outside-toplevel
  seconds["imports"] = time.perf_counter() - started
  quiet_logs()
  cfg = config.from_file(config_cli.DEFAULT_CONFIG)
  cfg.train.epochs = epochs
  phase_start = time.perf_counter()

  def lap(name):
    nonlocal phase_start
    now = time.perf_counter()
    seconds[name] = seconds.get(name, 0.0) + now - phase_start
    phase_start = now

  with tempfile.TemporaryDirectory() as workdir:
    # A first run's compile: an empty persistent cache (a rerun would load the compiled steps).
    cfg.train.compile_cache_dir = os.path.join(workdir, "compile_cache")
    s = train.prepare(cfg, workdir)
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=cfg.checkpoint.max_to_keep,
                                   async_save=cfg.checkpoint.async_save)
    lap("setup_data_tokenizer")
    state = jax.block_until_ready(s.trainer.init(cfg.seed))
    lap("state_init")

    def batch_of(step):
      return s.trainer.put_batch(s.layout.pack([s.examples[i] for i in s.plan.example_ids(step)]))

    s.trainer.train_step.lower(state, batch_of(0)).compile()
    # The loop's jitted step loads this compile from the persistent cache the run sets up
    # (under a second on this CPU, counted in the steps).
    lap("compile")
    steps = range(s.total_steps)
    epoch_end = lambda done: done % s.plan.steps_per_epoch == 0 or done == steps.stop
    for held, record in loop.pipelined_steps(s, state, steps, epoch_end):
      lap("steps")
      if held is None:
        continue
      state, step = held, record["step"]
      s.dev.evaluate(s.trainer, state["params"])
      s.generations.at_epoch_end(s.plan.epoch_of(step - 1) + 1, step, state["params"])
      lap("epoch_end_eval_generate")
      if step == s.total_steps or loop.epoch_state_due(cfg, ckpts, s.generations):
        ckpts.save(step, state, dict(s.meta, step=step, epoch=step / s.plan.steps_per_epoch))
      lap("checkpoints")
    ckpts.close()
    s.generations.close()
    lap("checkpoints")
  total = sum(seconds.values())
  return {"seconds": seconds, "share": {k: v / total for k, v in seconds.items()},
          "total_s": total, "steps": s.total_steps}
