"""Where the one-device train step's time goes, by ablation (not part of run.py's figures).

  python bench/profile_step.py [--rounds 3] [--dropout 0.2] [--scanned]

Times, in one process and interleaved round by round (so machine load hits all alike), the full
`Trainer.train_step` and pieces of it on the benchmark model (8 layers, d 512, 8 x 512 tokens,
layers in a Python loop as for the MFU figure; --scanned: the default scanned stack): the step
without dropout, the loss's forward+backward alone, the AdamW update alone, the attention
core, the LM head + cross entropy, the dropout masks, and a "matmul skeleton": the
same weight and attention matmuls, forward and backward, with every elementwise op stripped.
The skeleton's time over the step's says how close the step could get by fusing everything
else away; its FLOP/s over the matmul peak says what the matmul shapes themselves reach.
"""

import argparse
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from common import (make_trainer, matmul_peak, median, mfu, model_setup,  # pylint: disable=wrong-import-position
                    synthetic_batch, timed)
from flops import train_flops  # pylint: disable=wrong-import-position

ROWS, LENGTH = 8, 512


def _skeleton_loss(params, x, n_layers):
  """The model's matmuls only: projections, QK^T, AV, SwiGLU's three, the LM head."""
  b, t, d = x.shape
  for i in range(n_layers):
    p = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    q, k, v = (jnp.einsum("btd,dnh->btnh", x, p[w]) for w in ("wq", "wk", "wv"))
    s = jnp.einsum("btnh,bsnh->bnts", q, k)
    o = jnp.einsum("bnts,bsnh->btnh", s * (1.0 / t), v)
    x = x + jnp.einsum("btnh,nhd->btd", o, p["wo"])
    x = x + ((x @ p["gate"]) * (x @ p["up"])) @ p["down"]
  return jnp.sum(x.reshape(b * t, d) @ params["head"])


def build(trainer, model_cfg, state, batch, dropout_top):
  """name -> (compiled fn, args) for every timed piece."""
  from lima_jax import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from lima_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from lima_jax.train_state import token_loss  # pylint: disable=import-outside-toplevel
  cfg = model_cfg
  # The steps donate their state: each gets its own copy, the other pieces another.
  fresh = lambda: jax.tree.map(jnp.copy, state)  # pylint: disable=unnecessary-lambda-assignment
  params = fresh()["params"]
  key = jax.random.key(0)
  pieces = {"train_step": (trainer.train_step.lower(state, batch).compile(), (fresh(), batch))}

  real_dropout = model_lib.residual_dropout
  model_lib.residual_dropout = lambda x, rate, key: x  # traced away in this compile only
  try:
    no_drop = trainer.train_step.lower(state, batch).compile()
  finally:
    model_lib.residual_dropout = real_dropout
  pieces["train_step_no_dropout"] = (no_drop, (fresh(), batch))
  batch = jax.tree.map(lambda x: x[0], batch)  # the pieces below take the one micro-batch

  def loss(p):
    total, count = token_loss(trainer.model(p), batch, dropout_key=key)
    return total / count
  grad_fn = jax.jit(jax.value_and_grad(loss))
  pieces["loss_fwd_bwd"] = (grad_fn, (params,))
  grads = grad_fn(params)[1]

  def update(g, opt_state, p):
    updates, opt_state = trainer.optimizer.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state
  pieces["adamw_update"] = (jax.jit(update), (grads, fresh()["opt_state"], params))

  x = jax.random.normal(key, (ROWS, LENGTH, cfg.d_model), jnp.float32)
  shape = (ROWS, LENGTH, cfg.n_heads, cfg.head_dim)
  q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
  mask = attention_lib.segment_causal_mask(batch["segment_ids"])

  def attention(q, k, v):
    return jnp.sum(attention_lib.causal_attention(q, k, v, mask) ** 2)
  layers = cfg.n_layers
  pieces["attention_core_one_layer"] = (jax.jit(jax.grad(attention, argnums=(0, 1, 2))), (q, k, v))

  def head_ce(x, head):
    # The model's own LM head (final norm stubbed out): fp32 logits over the padded vocabulary.
    stub = types.SimpleNamespace(cfg=cfg, final_norm=lambda y: y, lm_head=head, embed=None)
    logits = model_lib.Llama.logits(stub, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))
  pieces["lm_head_ce"] = (jax.jit(jax.grad(head_ce, argnums=(0, 1))),
                          (x, params["lm_head"]))

  def masks(x):
    rates = model_lib.residual_dropout_rates(layers, dropout_top)
    out = x
    for i in range(2 * layers):
      out = model_lib.residual_dropout(out, rates[i // 2], jax.random.fold_in(key, i))
    return out
  pieces["dropout_masks_all_layers"] = (jax.jit(masks), (x,))

  skeleton = {"blocks": {n: params["blocks"][grp][n] for grp, names in
                         (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("gate", "up", "down")))
                         for n in names},
              "head": params["lm_head"]}
  pieces["matmul_skeleton"] = (jax.jit(jax.grad(lambda p, x: _skeleton_loss(p, x, layers))),
                               (skeleton, x))
  return pieces


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dropout", type=float, default=None)
  parser.add_argument("--scanned", action="store_true",
                      help="scan the layers (the default config) instead of the MFU figure's loop")
  args = parser.parse_args()
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  cfg, model_cfg = model_setup(dropout=args.dropout, scan_layers=args.scanned)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  trainer = make_trainer(cfg, model_cfg, mesh)
  state = trainer.init(cfg.seed)
  batch = trainer.put_batch(synthetic_batch(ROWS, LENGTH, model_cfg.vocab_size))
  pieces = build(trainer, model_cfg, state, batch, model_cfg.residual_dropout_top)
  times = {name: [] for name in pieces}
  peaks = []
  for round_ in range(args.rounds + 1):  # round 0 warms up
    if round_:
      peaks.append(matmul_peak())
    for name, (fn, fargs) in pieces.items():
      seconds, out = timed(fn, *fargs)
      if round_:
        times[name].append(seconds)
      if name.startswith("train_step"):  # donated: carry the new state
        pieces[name] = (fn, (out[0], batch))
  step = median(times["train_step"])
  flops = train_flops(model_cfg, ROWS, LENGTH)
  # The skeleton does the model's matmul FLOPs: its FLOP/s over the peak bounds a fused step.
  report = {"matmul_peak_flops_per_s": median(peaks), "model_flops_per_step": flops,
            "mfu_vs_matmul": mfu(flops, times["train_step"], peaks),
            "seconds": {k: median(v) for k, v in times.items()},
            "share_of_step": {k: median(v) / step for k, v in times.items()}}
  # One layer's attention was timed; the step runs n_layers of them.
  report["share_of_step"]["attention_core_all_layers"] = (
      report["seconds"]["attention_core_one_layer"] * model_cfg.n_layers / step)
  report["skeleton_flops_per_s_over_peak"] = (
      flops / report["seconds"]["matmul_skeleton"] / report["matmul_peak_flops_per_s"])
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
