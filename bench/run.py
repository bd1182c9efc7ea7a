"""The benchmark suite: every figure a ratio measured inside this one run.

  python bench/run.py [--json] [--rounds 5] [--compile-repeats 3] [--remat-rounds 3]

1. MFU of the train step over the matmul peak the same process measures (1 device, 8 devices),
   with the layers in a Python loop and scanned;
2. packing efficiency on a LIMA-shaped length distribution (ours, pad to 2048, pad to batch max);
3. compile time of an 80-layer model over a 2-layer one;
4. the start-up split of the default toy run (seconds and share of the whole);
5. tokens/s against transformers' LlamaForCausalLM + torch AdamW on the same CPU (in its own
   process, both steps over the same matmul yardstick);
6. remat policies (none / full / save_dots): step time and compiled-step memory over 'none' on the
   benchmark model, and the planner's bytes per device for the 7B and 65B presets.

Measurements that need a given device count run in fresh processes (JAX fixes the count when it
starts). See bench/README.md for what each figure means.
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import run_worker  # pylint: disable=wrong-import-position

WORKER_TIMEOUT_S = 600


def _worker(name: str, args: list[str]) -> None:
  """Child side of run_worker: one measurement, printed as the last line of JSON."""
  if name == "throughput":
    import throughput  # pylint: disable=import-outside-toplevel
    out = throughput.measure(rounds=int(args[0]))
  elif name == "torch":
    import throughput  # pylint: disable=import-outside-toplevel
    out = throughput.measure_torch(rounds=int(args[0]))
  elif name == "compile":
    import compile_depth  # pylint: disable=import-outside-toplevel
    out = compile_depth.measure(repeats=int(args[0]))
  elif name == "startup":
    import startup  # pylint: disable=import-outside-toplevel
    out = startup.measure(epochs=int(args[0]))
  elif name == "remat":
    import remat  # pylint: disable=import-outside-toplevel
    out = remat.measure(rounds=int(args[0]))
  elif name == "remat_plan":
    import remat  # pylint: disable=import-outside-toplevel
    out = {"plan": remat.plan_memory(args[0], args[1])}
  else:
    raise SystemExit(f"unknown worker {name}")
  print(json.dumps(out), flush=True)


def run_all(rounds: int, compile_repeats: int, remat_rounds: int, log) -> dict:
  started = time.perf_counter()
  log("packing efficiency ...")
  import packing_efficiency  # pylint: disable=import-outside-toplevel
  packing = packing_efficiency.efficiencies(packing_efficiency.lima_lengths())
  log("compile time, 2 vs 80 layers ...")
  compile_ = run_worker("compile", 1, WORKER_TIMEOUT_S, compile_repeats)
  log("start-up split of the toy run ...")
  startup = run_worker("startup", 8, WORKER_TIMEOUT_S, 2)
  log("train step, 1 device ...")
  one = run_worker("throughput", 1, WORKER_TIMEOUT_S, rounds)
  log("PyTorch reference ...")
  torch_ = run_worker("torch", 1, WORKER_TIMEOUT_S, rounds)
  log("train step, 8 devices ...")
  eight = run_worker("throughput", 8, WORKER_TIMEOUT_S, rounds)
  log("remat policies, 1 device ...")
  remat_ = run_worker("remat", 1, WORKER_TIMEOUT_S, remat_rounds)
  log("remat policies, planner at 7B and 65B ...")
  import remat  # pylint: disable=import-outside-toplevel
  remat_plan = remat.plan_all()
  return {
      "mfu_vs_matmul": {"one_device": one["mfu_vs_matmul"], "mesh_8": eight["mfu_vs_matmul"],
                        "pytorch_one_device": torch_["mfu_vs_matmul"],
                        "one_device_scanned": one["mfu_vs_matmul_scanned"],
                        "mesh_8_scanned": eight["mfu_vs_matmul_scanned"],
                        "model_flops_per_step": one["model_flops_per_step"],
                        "one_device_detail": one, "mesh_8_detail": eight,
                        "pytorch_detail": torch_},
      "packing_efficiency": packing,
      "compile_ratio_80_vs_2": compile_["ratio"],
      "compile": compile_,
      "startup_share": startup["share"],
      "startup_s": startup["seconds"],
      # Same FLOPs per step, each step over the matmul peak timed beside it: the tokens/s
      # ratio, with the load drift between the two processes cancelled.
      "vs_pytorch": one["mfu_vs_matmul"] / torch_["mfu_vs_matmul"],
      "scanned_step_time_vs_unrolled": {"one_device": one["scanned_step_time_vs_unrolled"],
                                        "mesh_8": eight["scanned_step_time_vs_unrolled"]},
      "tokens_per_s": {"jax_one_device": one["tokens_per_s"],
                       "jax_mesh_8": eight["tokens_per_s"],
                       "pytorch": torch_["tokens_per_s"]},
      "remat": remat_["figures"],
      "remat_detail": remat_["detail"],
      "remat_plan": remat_plan,
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version()},
      "elapsed_s": time.perf_counter() - started,
  }


def _table(r: dict) -> str:
  m, p, c = r["mfu_vs_matmul"], r["packing_efficiency"], r["compile"]
  lines = [
      f"MFU / matmul peak, 1 device        {m['one_device']:.2f}  (PyTorch {m['pytorch_one_device']:.2f})",
      f"MFU / matmul peak, 8-device mesh   {m['mesh_8']:.2f}",
      f"  with the layers scanned          {m['one_device_scanned']:.2f} (1 device), "
      f"{m['mesh_8_scanned']:.2f} (8 devices)",
      f"packing efficiency                 {p['packed']:.2f}  (pad to 2048 {p['pad_to_max_length']:.2f}, "
      f"pad to batch max {p['pad_to_batch_max']:.2f}; whole step at once {p['packed_whole_step']:.2f})",
      "  by rows per micro-batch          " + ", ".join(
          f"{rows}: {e:.2f}" for rows, e in p["packed_by_micro_batch_rows"].items()),
      f"compile 80 / 2 layers              {r['compile_ratio_80_vs_2']:.2f}  "
      f"({c['total_s_80']:.1f}s / {c['total_s_2']:.1f}s)",
      f"tokens/s vs PyTorch                {r['vs_pytorch']:.2f}",
      "start-up split of the toy run (2 epochs):"]
  for phase, share in r["startup_share"].items():
    lines.append(f"  {phase:<30} {r['startup_s'][phase]:6.1f}s  {share:5.1%}")
  import remat  # pylint: disable=import-outside-toplevel
  lines.extend(remat.table_lines(r["remat"], r["remat_plan"]))
  lines.append(f"(suite took {r['elapsed_s']:.0f}s)")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--rounds", type=int, default=5, help="timed train steps per device count")
  parser.add_argument("--compile-repeats", type=int, default=3)
  parser.add_argument("--remat-rounds", type=int, default=3,
                      help="interleaved rounds of the three remat policies' steps")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args()
  if args.worker:
    _worker(args.worker, rest)
    return
  log = (lambda msg: print(msg, file=sys.stderr, flush=True))
  result = run_all(args.rounds, args.compile_repeats, args.remat_rounds, log)
  print(json.dumps(result, indent=1) if args.json else _table(result))


if __name__ == "__main__":
  main()
