"""The human-readable side of `python -m lima_jax.plan`: the report it prints (model, shape, mesh,
steps, rows, LR at each epoch's end, dropout per layer, memory per device against HBM, compute
time, the whole run's wall-time split) and, when the run does not fit, what to change.

Everything here formats the dict `lima_jax.plan.plan_run` returns (the advice also reads the
config and the chip table of `lima_jax.topology`); nothing is compiled or measured here.
"""

import math

from lima_jax import topology


def advice(report: dict, cfg, topo: topology.Topology) -> list[str]:
  """What to change when the run does not fit, most effective first."""
  total = report["bytes_per_device"] * report["devices"]
  need = math.ceil(total / topo.hbm_bytes)
  bigger = topology.slice_for(topo, need)
  tips = [f"more fsdp: the step needs about {_bytes(total)} over the slice, so about {need} "
          f"devices of {_bytes(topo.hbm_bytes)}"
          + (f" (e.g. --topology={bigger})" if bigger else "")]
  if cfg.mesh.data != 1 or cfg.mesh.tensor != 1:
    tips.append(f"shard the state over more devices: --config.mesh.fsdp=-1 with "
                f"--config.mesh.data=1 (now data={cfg.mesh.data}, tensor={cfg.mesh.tensor}); "
                "the state is replicated over 'data'")
  if cfg.model.remat != "full":
    tips.append(f"--config.model.remat=full (now {cfg.model.remat}): recompute each layer in "
                "the backward pass instead of keeping its activations")
  ways = report["batch_shards"]
  if report["micro_batch_rows"] > ways:
    tips.append(f"smaller micro-batches: --config.train.micro_batch_rows=0 (one row of "
                f"{report['max_length']} per batch shard; now {report['micro_batch_rows']} rows "
                f"over {ways} shards): activations are kept for one micro-batch at a time")
  return tips


def _shape(m: dict) -> str:
  rope = f"RoPE theta {m['rope_theta']:g}"
  if m["rope_scaling_type"] != "default":
    rope += f", {m['rope_scaling_type']} scaling x{m['rope_scaling_factor']:g}"
  if m["rope_scaling_type"] == "llama3":
    rope += (f" (low {m['rope_scaling_low_freq_factor']:g}, high "
             f"{m['rope_scaling_high_freq_factor']:g}, original "
             f"{m['rope_scaling_original_max_position']:,})")
  return (f"d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads / "
          f"{m['n_kv_heads']} KV, FFN {m['ffn_dim']}, {rope}, norm eps {m['norm_eps']:g}"
          + (", tied embeddings" if m["tie_embeddings"] else ""))


def _trains(report: dict) -> str:
  if not report["lora"]:
    return f"every weight (full fine-tuning), params in {report['param_dtype']}"
  lo = report["lora"]
  rows = lo.get("token_rows", 0)
  return (f"LoRA adapters of rank {lo['rank']} (alpha {lo['alpha']:g}, dropout {lo['dropout']:g}) "
          f"on {','.join(lo['targets'])}"
          + (f" and the embedding and LM-head rows of {rows} added token{'s' * (rows > 1)} "
             "(a new EOT), in float32" if rows else "")
          + f": {_count(report['trainable_params'])} of "
          f"{_count(report['params'])} params; the base frozen in {report['param_dtype']}")


def _bytes(n: float) -> str:
  return f"{n / topology.GIB:.2f} GiB" if n >= topology.GIB / 10 else f"{n / 2**20:.1f} MiB"


def _gb(n: float) -> str:
  return f"{n / 1e9:,.0f} GB" if n >= 1e10 else f"{n / 1e9:.2g} GB"


def _count(n: float) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render(report: dict, config_name: str) -> str:
  """The report on stdout: one line per part, the dropout rates ten to a line."""
  lines = [
      f"lima_jax plan: {config_name} on {report['topology']} ({report['devices']} x "
      f"{report['chip']}, {_bytes(report['hbm_bytes_per_device'])} each)",
      f"  model     {_count(report['params'])} params (vocabulary {report['vocab_size']:,} "
      f"with EOT), remat {report['remat']}, compute {report['compute_dtype']}, loss "
      + (f"{report['loss_chunk_tokens']:,} positions at a time" if report["loss_chunk_tokens"]
         else "over whole rows"),
      "  shape     " + _shape(report["model"]),
      "  trains    " + _trains(report),
      "  mesh      " + " ".join(f"{k}={v}" for k, v in report["mesh"].items()),
      f"  steps     {report['num_examples']:,} examples, batch {report['batch_size']}: "
      f"{report['steps_per_epoch']} steps/epoch x {report['epochs']} epochs = "
      f"{report['total_steps']} steps",
      f"  rows      up to {report['micro_batches']} micro-batches x "
      f"{report['micro_batch_rows']} packed rows x {report['max_length']} tokens per step, "
      f"{report['mean_rows_computed']:.1f} rows computed on average ({report['rows_source']})",
      "  lr        of each epoch's last step: "
      + ", ".join(f"{lr:.3g}" for lr in report["lr_at_epoch_end"]),
      f"  dropout   per layer ({len(report['dropout_per_layer'])} layers, bottom to top):",
  ]
  rates = report["dropout_per_layer"]
  lines += ["            " + " ".join(f"{p:.3f}" for p in rates[i:i + 10])
            for i in range(0, len(rates), 10)]
  used, hbm = report["bytes_per_device"], report["hbm_bytes_per_device"]
  outputs = report["output_bytes"] - report["alias_bytes"]
  lines.append(
      f"  memory    per device: {_bytes(report['argument_bytes'])} arguments + "
      f"{_bytes(outputs)} outputs not aliased to them + "
      f"{_bytes(report['temp_bytes'] - report['cpu_upcast_bytes'])} temporaries = "
      f"{_bytes(used)} of {_bytes(hbm)} HBM "
      f"({100 * used / hbm:.0f}%): {'fits' if report['fits'] else 'DOES NOT FIT'}")
  state = report["state_bytes_per_device"]
  lines.append(
      "            of which the state: "
      + (f"{_bytes(state['frozen_params'])} frozen base ({report['param_dtype']}) + "
         f"{_bytes(state['trained_params'])} "
         f"{'adapters and token rows' if report['lora'].get('token_rows') else 'adapters'} "
         "(float32)" if report["lora"]
         else f"{_bytes(state['trained_params'])} params ({report['param_dtype']})")
      + f" + {_bytes(state['opt_state'])} optimizer state"
      + (f"; XLA:CPU's f32 copies of the bf16 params ({_bytes(report['cpu_upcast_bytes'])} more "
         "temporaries) are left out: a TPU computes in bf16" if report["cpu_upcast_bytes"] else ""))
  tflop = report["flops_per_step"] / 1e12
  compute = f"  compute   {tflop:,.0f} TFLOP" if tflop >= 100 else f"  compute   {tflop:.3g} TFLOP"
  compute += " per step (model FLOPs)"
  if report["step_time_s"] is not None:
    compute += (f"; at {100 * report['mfu']:.0f}% MFU {report['step_time_s']:.2f} s per step, "
                f"{report['compute_time_s'] / 60:.1f} min for {report['total_steps']} steps "
                "(compute only; the whole run's wall time below)")
  lines.append(compute)
  if report["wall_time"] is not None:
    lines += render_wall_time(report)
  lines.append(f"  compiled  for {report['devices']} fake CPU devices in "
               f"{report['compile_s']:.1f} s (XLA:CPU's buffer assignment; a TPU compile may "
               "differ somewhat)")
  return "\n".join(lines)



def render_wall_time(report: dict) -> list[str]:
  """The wall-time split: each part in seconds and as a share of the whole."""
  w, b, a = report["wall_time"], report["checkpoint_bytes"], report["assumptions"]
  d = report["wall_time_detail"]
  saves = d["saves"]
  notes = {
      "weights_load_s": (f"{_gb(report['load_bytes'])} of "
                         f"{'frozen base ' if report.get('lora') else ''}weights over "
                         f"{a['hosts']} host{'s' if a['hosts'] > 1 else ''} at "
                         f"{a['read_gb_per_s']:g} GB/s each"
                         if a["source_bytes_per_param"] else "random init: nothing to read"),
      "compile_s": "train step, eval step, decode loop",
      "steps_s": f"{report['total_steps']} steps at {100 * report['mfu']:.0f}% MFU",
      "epoch_end_s": (f"dev loss {d['dev_loss_s_per_epoch']:.1f} s per epoch; dev generations "
                      f"{d['generations_s_per_epoch']:.0f} s per generating epoch, decode steps "
                      f"of {1e3 * d['decode_step_s']:.1f} ms (HBM-bound)"),
      "checkpoint_s": (f"waits only: {saves['full_state']} "
                       f"{'adapter' if report.get('lora') else 'full'} states of "
                       f"{_gb(b['full_state'])}, {saves['params_export']} "
                       f"{'adapter' if report.get('lora') else 'params'} exports of "
                       f"{_gb(b['params_export'])}, written at "
                       f"{a['write_gb_per_s']:g} GB/s per host"),
  }
  names = {"weights_load_s": "load", "compile_s": "compile", "steps_s": "steps",
           "epoch_end_s": "epoch end", "checkpoint_s": "checkpoint"}
  lines = [f"  wall time {w['total_s'] / 60:.1f} min in all, {100 * w['non_compute_share']:.0f}% "
           "of it besides the steps (assumptions: --read_gb_per_s, --write_gb_per_s, ...)"]
  for key, name in names.items():
    share = 100 * w[key] / w["total_s"]
    lines.append(f"    {name:<11}{w[key]:8.0f} s {share:4.0f}%  ({notes[key]})")
  return lines


def does_not_fit(report: dict, topo: topology.Topology, tips: list[str]) -> str:
  """The stderr message of a run that does not fit: the bytes against the chip's, then `tips`."""
  return "\n".join(
      [f"error: the run does not fit {topo.name}: {_bytes(report['bytes_per_device'])} per "
       f"device, the chip has {_bytes(topo.hbm_bytes)}. Change one of:",
       *(f"  - {tip}" for tip in tips)])
