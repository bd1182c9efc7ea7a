"""AdamW with the LIMA learning-rate schedule.

LIMA: lr 1e-5 decaying linearly to 1e-6 by the end of training, no warmup, AdamW b1 0.9, b2 0.95,
weight decay 0.1. Weight decay applies to every weight matrix (attention, MLP, the embedding and
the LM head) and not to the RMSNorm scales, the usual choice for LLaMA fine-tuning.
"""

import jax
import optax


def lima_schedule(learning_rate: float, end_learning_rate: float, total_steps: int,
                  warmup_steps: int = 0) -> optax.Schedule:
  """lr(step) = lr0 + (lr_end - lr0) * step / total_steps, after an optional linear warmup.

  The value at `step` is the LR used by the update of that step (0-based), so the LR in effect
  after epoch e of a run with S steps per epoch is lr(e * S).
  """
  decay = optax.linear_schedule(learning_rate, end_learning_rate, max(total_steps, 1))
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  decay_after = optax.linear_schedule(
      learning_rate + (end_learning_rate - learning_rate) * warmup_steps / max(total_steps, 1),
      end_learning_rate, max(total_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, decay_after], [warmup_steps])


def decay_mask(params):
  """True for params that get weight decay: everything but the norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """cfg is the `optimizer` config section."""
  schedule = lima_schedule(cfg.learning_rate, cfg.end_learning_rate, total_steps,
                           cfg.warmup_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.grad_clip_norm > 0:
    adamw = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
  return adamw, schedule
