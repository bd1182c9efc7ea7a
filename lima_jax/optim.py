"""AdamW with the LIMA learning-rate schedule.

LIMA: lr 1e-5 decaying linearly to 1e-6 by the end of training, no warmup, AdamW b1 0.9, b2 0.95,
weight decay 0.1. Weight decay applies to every weight matrix (attention, MLP, the embedding and
the LM head) and not to the RMSNorm scales, the usual choice for LLaMA fine-tuning.

The learning rate is a hyperparameter of the optimizer state (`optax.inject_hyperparams`) that the
train step sets from its own step counter before every update (`set_learning_rate`), so the LR
applied is the LR logged even after a skipped step: optax's internal counters do not advance when
an update is skipped, the train step's counter does.
"""

import jax
import jax.numpy as jnp
import optax

from lima_jax.errors import LimaError


def lima_schedule(learning_rate: float, end_learning_rate: float, total_steps: int,
                  warmup_steps: int = 0) -> optax.Schedule:
  """The LR of the update of step s (0-based) of a `total_steps`-step run.

  Without warmup: lr(s) = lr0 + (lr_end - lr0) * s / (total_steps - 1), so the first step uses
  `learning_rate` and the last one (s = total_steps - 1) exactly `end_learning_rate` (the paper:
  "linearly decaying to 1e-6 by the end of training"; LIMA's 480 steps: 1e-5, ..., 1e-6).
  With warmup: lr(s) = lr0 * s / warmup_steps for s < warmup_steps, then linear from lr0 at
  s = warmup_steps to lr_end at the last step. A one-step run uses `end_learning_rate`.
  """
  last = max(total_steps - 1, 0)
  decay_steps = last - warmup_steps
  if decay_steps <= 0:  # the last step is the first one after warmup (or the only step)
    decay = optax.constant_schedule(end_learning_rate)
  else:
    decay = optax.linear_schedule(learning_rate, end_learning_rate, decay_steps)
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params):
  """True for params that get weight decay: everything but the norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """cfg is the `optimizer` config section; the caller sets each update's LR from the schedule
  with `set_learning_rate`. Raises LimaError if warmup would take the whole run."""
  if cfg.warmup_steps and cfg.warmup_steps >= total_steps:
    raise LimaError(f"config optimizer.warmup_steps: {cfg.warmup_steps} warmup steps, but the "
                    f"run has only {total_steps} steps (steps per epoch x train.epochs), so it "
                    f"would never reach optimizer.learning_rate; use at most {total_steps - 1}")
  schedule = lima_schedule(cfg.learning_rate, cfg.end_learning_rate, total_steps,
                           cfg.warmup_steps)

  def adamw(learning_rate):
    tx = optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.grad_clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx

  return optax.inject_hyperparams(adamw)(learning_rate=cfg.learning_rate), schedule


def set_learning_rate(opt_state, learning_rate):
  """`opt_state` of a `make_optimizer` optimizer with the LR of its next update replaced.

  A state without the hyperparameter (an optimizer with no learning rate, such as the identity
  used to lay out imported params) is returned unchanged."""
  hyperparams = getattr(opt_state, "hyperparams", None)
  if hyperparams is None or "learning_rate" not in hyperparams:
    return opt_state
  old = hyperparams["learning_rate"]
  return opt_state._replace(hyperparams=dict(
      hyperparams, learning_rate=jnp.asarray(learning_rate, old.dtype)))
