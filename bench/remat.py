"""Remat policies (`model.remat`: none, full, save_dots): the step time each costs and the memory
each saves.

  python bench/remat.py [--rounds 3] [--no-plan] [--json]

1. The benchmark model (8 layers, d 512, FFN 1408, 8 heads, fp32, 8 rows x 512 tokens, LIMA's
   residual dropout and AdamW) on one CPU device, one `Trainer` per policy. Memory: XLA's
   analysis of the compiled train step; its temporaries hold what the forward keeps for the
   backward (what remat trades), while arguments and outputs (state and batch) are the same for
   every policy. Speed: each round times a matmul peak, then one step of every policy (the order
   rotated each round, so a load change hits each position alike); figures are medians of the
   per-round ratios to 'none'. Remat's recomputation is not counted in the model FLOPs, so MFU
   falls by as much as the step slows down.
2. Real scale, memory only: `lima_jax.plan`'s AOT compile of the 7B and 65B presets on their
   intended TPU slices (abstract inputs on fake CPU devices, 20-50 s per policy on the 2-core
   CPU), in fresh processes with the slice's device count.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=wrong-import-position
from common import (REPO, make_trainer, matmul_peak, median, mfu, model_setup, run_worker,
                    synthetic_batch, timed)
from flops import train_flops
# pylint: enable=wrong-import-position

POLICIES = ("none", "full", "save_dots")
ROWS, LENGTH = 8, 512
# The presets' intended slices (README's "Run on a TPU pod"), planned for LIMA's 1,000 examples.
PLAN_TARGETS = (("lima_7b", "v5p-8"), ("lima_65b", "v5p-32"))
PLAN_EXAMPLES = 1000
WORKER_TIMEOUT_S = 600


def trainer_for(policy: str, cfg, model_cfg, mesh):
  """The benchmark's Trainer with `model.remat` set to `policy`, all else as given."""
  return make_trainer(cfg, dataclasses.replace(model_cfg, remat=policy), mesh)


def memory(compiled) -> dict:
  """Bytes of XLA's memory analysis of a compiled step."""
  m = compiled.memory_analysis()
  return {"temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
          "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}


def measure(rounds: int, rows: int = ROWS, length: int = LENGTH, **shape) -> dict:
  """Memory and interleaved step time of every policy on one device; `shape` goes to
  common.model_setup (the benchmark model when empty)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  cfg, model_cfg = model_setup(**shape)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  host_batch = synthetic_batch(rows, length, model_cfg.vocab_size)
  steps, states, mem, losses = {}, {}, {}, {p: [] for p in POLICIES}
  batch = first = None
  for policy in POLICIES:
    trainer = trainer_for(policy, cfg, model_cfg, mesh)
    # Through put_batch, whatever layout synthetic_batch returns.
    batch = trainer.put_batch(host_batch)
    # The initial state does not depend on the policy; each trainer gets its own copy, since
    # its step donates it.
    first = first or trainer.init(cfg.seed)
    state = jax.tree.map(jnp.copy, first)
    steps[policy] = trainer.train_step.lower(state, batch).compile()
    mem[policy] = memory(steps[policy])
    _, (states[policy], metrics) = timed(steps[policy], state, batch)  # warm-up run
    losses[policy].append(float(metrics["loss"]))
  flops = train_flops(model_cfg, rows, length)
  peaks, step_s, cpu_s = [], {p: [] for p in POLICIES}, {p: [] for p in POLICIES}
  for round_ in range(rounds):
    peaks.append(matmul_peak())
    for policy in POLICIES[round_ % 3:] + POLICIES[:round_ % 3]:
      cpu = time.process_time()
      seconds, (states[policy], metrics) = timed(steps[policy], states[policy], batch)
      cpu_s[policy].append(time.process_time() - cpu)
      step_s[policy].append(seconds)
      losses[policy].append(float(metrics["loss"]))
  base_temp = mem["none"]["temp_bytes"]
  figures = {p: {
      "step_time_vs_none": median(s / n for s, n in zip(step_s[p], step_s["none"])),
      # The process's CPU seconds per step moves far less with other jobs' load than wall time.
      "step_cpu_time_vs_none": median(c / n for c, n in zip(cpu_s[p], cpu_s["none"])),
      "temp_memory_vs_none": mem[p]["temp_bytes"] / base_temp,
      "temp_bytes": mem[p]["temp_bytes"],
      "argument_bytes": mem[p]["argument_bytes"], "output_bytes": mem[p]["output_bytes"],
      "mfu_vs_matmul": mfu(flops, step_s[p], peaks),
  } for p in POLICIES}
  # Remat only trades memory for time: every policy must see the same losses step by step.
  loss_diff = max(abs(a - b) for p in POLICIES for a, b in zip(losses[p], losses["none"]))
  detail = {"step_s": step_s, "step_cpu_s": cpu_s, "matmul_flops_per_s": peaks, "memory": mem,
            "model_flops_per_step": flops, "losses": losses, "loss_max_abs_diff": loss_diff,
            "shape": {"rows": rows, "length": length, "n_layers": model_cfg.n_layers,
                      "d_model": model_cfg.d_model, "ffn_dim": model_cfg.ffn_dim}}
  return {"figures": figures, "detail": detail}


def plan_memory(preset: str, topology_name: str) -> dict:
  """Per policy, lima_jax.plan's bytes per device for `preset` on `topology_name` (this
  process must have the slice's device count of CPU devices)."""
  from lima_jax import config, plan, topology  # pylint: disable=import-outside-toplevel
  topo = topology.parse(topology_name)
  out = {}
  for policy in POLICIES:
    cfg = config.from_file(os.path.join(REPO, "configs", f"{preset}.py"))
    cfg.model.remat = policy
    report = plan.plan_run(cfg, topo, num_examples=PLAN_EXAMPLES)
    out[policy] = {k: report[k] for k in ("bytes_per_device", "temp_bytes", "hbm_bytes_per_device",
                                          "fits", "rows_per_step", "compile_s")}
  return out


def plan_all() -> dict:
  """plan_memory for every PLAN_TARGETS entry, each in a fresh process of its device count.
  The processes run side by side: an XLA compile is mostly one thread, and nothing is timed."""
  from lima_jax import topology  # pylint: disable=import-outside-toplevel
  with concurrent.futures.ThreadPoolExecutor(len(PLAN_TARGETS)) as pool:
    futures = {f"{preset} {name}": pool.submit(run_worker, "remat_plan",
                                               topology.parse(name).devices, WORKER_TIMEOUT_S,
                                               preset, name)
               for preset, name in PLAN_TARGETS}
    return {target: future.result()["plan"] for target, future in futures.items()}


def table_lines(figures: dict, plan: dict | None) -> list[str]:
  """The text table's remat lines (run.py prints them too)."""
  lines = ["remat, benchmark model (1 device)  step time / none (CPU s)  temp memory / none  MFU"]
  for policy, f in figures.items():
    lines.append(f"  {policy:<33} {f['step_time_vs_none']:5.2f} ({f['step_cpu_time_vs_none']:.2f})"
                 f"            {f['temp_memory_vs_none']:5.2f}               "
                 f"{f['mfu_vs_matmul']:.2f}")
  for target, per_policy in (plan or {}).items():
    gib = "  ".join(f"{p} {v['bytes_per_device'] / 2**30:.0f}" for p, v in per_policy.items())
    lines.append(f"remat, planner {target:<19} GiB per device: {gib}")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--no-plan", action="store_true", help="skip the real-scale planner part")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args()
  # One device, as run.py's worker gets; under heavy load a step can take 30 s, so the time
  # limit grows with the rounds.
  out = run_worker("remat", 1, WORKER_TIMEOUT_S + 120 * args.rounds, args.rounds)
  if not args.no_plan:
    out["plan"] = plan_all()
  print(json.dumps(out, indent=1) if args.json else
        "\n".join(table_lines(out["figures"], out.get("plan"))))


if __name__ == "__main__":
  main()
