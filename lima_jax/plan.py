"""`python -m lima_jax.plan`: does the run fit the slice, and how long will it take? Before renting.

  python -m lima_jax.plan --config=configs/lima_65b.py --topology=v5p-32 --num_examples=1000
  python -m lima_jax.plan --config=configs/lima_7b.py --topology=v5e-16 --json

Builds the real train step (the trainer's model, optimizer, shardings and packed batch shape) with
abstract inputs on a fake CPU mesh of the topology's device count, AOT-compiles it and reads XLA's
memory analysis: nothing the size of the model is ever allocated. Reports the step count, the LR at
each epoch's end, the dropout rate per layer, bytes per device against the chip's HBM and the
compute time at a stated MFU, and the whole run's wall time beside it (`lima_jax.wall_time`:
weight loading, compiling, epoch-end dev loss and generations, checkpoint writes). Exit status 0
when the run fits, 1 when it does not (with what to change), 2 for bad input.
`--config.KEY=VALUE` overrides work as in `lima_jax.train`. The report's wording lives in
`lima_jax.plan_report`.
"""

import json
import math
import os
import sys
import tempfile
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from lima_jax import (config, config_cli, cpu_upcast, data, optim, plan_report, sharding,
                      topology, train, wall_time)
from lima_jax.cli import fail, quiet_logs, use_fake_cpu_devices
from lima_jax.errors import LimaError
from lima_jax.model import residual_dropout_rates
from lima_jax.train_state import BATCH_KEYS, Trainer
from lima_jax.trained import Trained

LIMA_EXAMPLES = 1000
LIMA_AVG_TOKENS = 750  # the LIMA training set's mean conversation length in LLaMA tokens
LLAMA_VOCAB = 32_001  # LLaMA-1/2's 32,000 pieces + EOT, when no tokenizer is given

_TOPOLOGY = flags.DEFINE_string("topology", None, "v4-N, v5e-N (v5litepod-N), v5p-N, v6e-N or "
                                "cpu:N.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Training examples. Default: those of data.train_path when it is set, "
    f"else LIMA's {LIMA_EXAMPLES}.")
_AVG_TOKENS = flags.DEFINE_integer(
    "avg_tokens", LIMA_AVG_TOKENS, "Assumed mean tokens per example, for the packed row count "
    "when it is not known from data (data.rows_per_step or data.train_path).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary with EOT. Default: from "
                              f"data.tokenizer_path when set, else {LLAMA_VOCAB:,} (LLaMA).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the report.")
_DEFAULTS = wall_time.Assumptions()
_READ = flags.DEFINE_float(
    "read_gb_per_s", _DEFAULTS.read_Bps / 1e9, "Per-host read bandwidth from storage (GCS) in "
    "GB/s, for the weights. Default: a cautious assumption (lima_jax/wall_time.py says why).")
_WRITE = flags.DEFINE_float(
    "write_gb_per_s", _DEFAULTS.write_Bps / 1e9, "Per-host write bandwidth to storage in GB/s, "
    "for checkpoints. Default: a cautious assumption (lima_jax/wall_time.py says why).")
_D2H = flags.DEFINE_float(
    "d2h_gb_per_s", _DEFAULTS.d2h_Bps / 1e9, "Device-to-host copy per chip in GB/s, the "
    "blocking part of an asynchronous save (Orbax's performance guide: 32 GB/s on TPU PCIe).")
_SOURCE = flags.DEFINE_enum(
    "source_dtype", "bfloat16", ["bfloat16", "float16", "float32", "none"],
    "Dtype of the pretrained weights read at start-up (LLaMA is released in 16 bits); none: "
    "random init, nothing to read.")
_COMPILE = flags.DEFINE_float(
    "compile_s", -1.0, "Seconds of compiling to assume; -1: what this plan measures, the XLA:CPU "
    "compile of the train step plus twice the eval step's (eval and the decode loop).")
_DEV = flags.DEFINE_integer("dev_prompts", _DEFAULTS.dev_prompts,
                            "Dev prompts generated at each of eval.generate_epochs and scored "
                            "every epoch (LIMA: 50); 0 = no dev set.")
for _name in ("config", "show_config"):  # lima_jax.config_cli's flags, listed by --help
  flags.declare_key_flag(_name)


def plan_run(cfg, topo: topology.Topology, *, num_examples: int | None = None,
             avg_tokens: int = LIMA_AVG_TOKENS, vocab_size: int = 0, mfu: float = 0.4,
             assume: wall_time.Assumptions = wall_time.Assumptions(),
             compile_s: float | None = None) -> dict:
  """Everything the report says, as one JSON-ready dict; raises LimaError for bad input.

  `assume` and `compile_s` (None: measured here) feed the wall-time split, which is None on a
  CPU topology (no peak FLOP/s or HBM bandwidth to time it by).

  Runs on the first `topo.devices` CPU devices of this process, which must have that many.
  """
  _validate(cfg)
  devices = _fake_devices(topo.devices)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
  source = _source(cfg)
  rows = source[0]["vocab_size"] if source else 0
  tokenizer = data.load_tokenizer(
      cfg.data.tokenizer_path, eot_token=cfg.data.eot_token, chat_format=cfg.data.chat_format,
      source_rows=rows) if cfg.data.tokenizer_path else None
  if tokenizer or not source:
    vocab = vocab_size or (tokenizer.vocab_size if tokenizer else LLAMA_VOCAB)
  else:  # the source's rows, plus LIMA's new EOT unless one is named or ours already holds it
    vocab = vocab_size or rows + (0 if source[1] or cfg.data.eot_token else 1)
  examples = None
  if num_examples is None and cfg.data.train_path:
    examples = _load_examples(cfg, tokenizer)
    num_examples = len(examples)
  num_examples = num_examples or LIMA_EXAMPLES

  epochs = data.EpochPlan(num_examples, cfg.train.batch_size, cfg.seed)
  total_steps = epochs.steps_per_epoch * cfg.train.epochs
  optimizer, schedule = optim.make_optimizer(cfg.optimizer, total_steps)
  model_cfg = train.model_config(cfg.model, vocab, source and source[0],
                                 pinned=config_cli.pinned_model_keys(),
                                 where=f"init_from {cfg.init_from}", lora_section=cfg.lora)
  # Without a tokenizer, EOT is LIMA's new token (the vocabulary's last id) unless one is named.
  eot = tokenizer.meta() if tokenizer else {"eot_id": vocab - 1,
                                            "eot_token": cfg.data.eot_token or data.EOT_TEXT}
  trainer = Trainer(model_cfg, optimizer, schedule, mesh, cfg.seed,
                    loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                    trained=Trained.of_run(model_cfg, eot))
  layout, mean_rows, rows_source = _layout(cfg, examples, epochs, total_steps, mesh, avg_tokens)

  started = time.perf_counter()
  compiled = trainer.train_step.lower(trainer.abstract_state,
                                      _abstract_batch(trainer, layout)).compile()
  step_compile_s = time.perf_counter() - started
  memory = compiled.memory_analysis()
  # Donated state: the outputs reuse the arguments' buffers (alias), so count them once.
  # XLA:CPU's f32 copies of bf16 params (a frozen bf16 base): no TPU makes them.
  upcast = cpu_upcast.f32_copies_of_bf16_arguments(compiled.as_text())
  used = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes - upcast + memory.generated_code_size_in_bytes)
  flops = _model_flops(trainer, mean_rows, cfg.data.max_length)
  step_s = (flops / (topo.devices * topo.peak_flops * mfu)) if topo.peak_flops else None
  times = None
  if step_s is not None:
    if compile_s is None:
      started = time.perf_counter()
      trainer.eval_step.lower(trainer.abstract_state["params"],
                              _abstract_batch(trainer, layout)).compile()
      compile_s = step_compile_s + 2 * (time.perf_counter() - started)
    length = cfg.data.max_length
    dev_rows = assume.dev_prompts * min(assume.dev_tokens, length) / length
    times = wall_time.wall_time(
        wall_time.run_of_plan(
            cfg, topo, trainer, steps_per_epoch=epochs.steps_per_epoch, step_s=step_s,
            flops_per_s=topo.devices * topo.peak_flops * mfu, compile_s=compile_s,
            dev_loss_flops=_model_flops(trainer, dev_rows, length, backward=False),
            batch_ways=sharding.batch_ways(mesh), a=assume),
        assume, wall_time.Policy.from_config(cfg))
  params = trainer.abstract_state["params"]
  trained = trainer.trainable(params)
  return {
      "topology": topo.name, "chip": topo.chip, "devices": topo.devices,
      "mesh": dict(mesh.shape), "remat": cfg.model.remat, "compute_dtype": cfg.model.compute_dtype,
      "params": trainer.num_params, "vocab_size": vocab,
      "param_dtype": cfg.model.param_dtype,
      "trainable_params": trainer.num_trainable,
      "lora": {"rank": model_cfg.lora_rank, "alpha": model_cfg.lora_alpha,
               "targets": list(model_cfg.lora_targets), "dropout": model_cfg.lora_dropout,
               "token_rows": len(trainer.trained.token_rows)}
              if trainer.uses_lora else None,
      "model": {k: getattr(model_cfg, k) for k in train.SHAPE_KEYS},
      "loss_chunk_tokens": cfg.train.loss_chunk_tokens,
      "num_examples": num_examples, "batch_size": cfg.train.batch_size,
      "steps_per_epoch": epochs.steps_per_epoch, "epochs": cfg.train.epochs,
      "total_steps": total_steps,
      "lr_at_epoch_end": [float(schedule((e + 1) * epochs.steps_per_epoch - 1))  # last step's
                          for e in range(cfg.train.epochs)],
      "dropout_per_layer": [round(float(p), 6) for p in residual_dropout_rates(
          model_cfg.n_layers, cfg.model.residual_dropout_top)],
      "rows_per_step": layout.micro_batches * layout.rows, "micro_batches": layout.micro_batches,
      "micro_batch_rows": layout.rows, "mean_rows_computed": mean_rows,
      "rows_source": rows_source, "max_length": cfg.data.max_length,
      "batch_shards": sharding.batch_ways(mesh),
      "argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
      "cpu_upcast_bytes": upcast,
      "bytes_per_device": used, "hbm_bytes_per_device": topo.hbm_bytes,
      # The state's parts on one device (arguments, as sharded): what LoRA changes.
      "state_bytes_per_device": {
          "frozen_params": _device_bytes(trainer.frozen(params)) if trainer.uses_lora else 0,
          "trained_params": _device_bytes(trained),
          "opt_state": _device_bytes(trainer.abstract_state["opt_state"])},
      "fits": used <= topo.hbm_bytes,
      "flops_per_step": flops, "mfu": mfu, "step_time_s": step_s,
      "compute_time_s": None if step_s is None else step_s * total_steps,
      "compile_s": step_compile_s,
      **(times or {"wall_time": None, "checkpoint_bytes": None, "load_bytes": None}),
      "assumptions": {"read_gb_per_s": assume.read_Bps / 1e9,
                      "write_gb_per_s": assume.write_Bps / 1e9,
                      "d2h_gb_per_s": assume.d2h_Bps / 1e9,
                      "source_bytes_per_param": assume.source_bytes_per_param,
                      "dev_prompts": assume.dev_prompts, "hosts": topo.hosts},
  }


def _device_bytes(tree) -> int:
  """Bytes of an abstract, sharded tree on one device (the shards are even: check_divisible)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _validate(cfg) -> None:
  """The config checks of a training run, less the data paths a plan does without."""
  checked = cfg.copy_and_resolve_references()
  for key in ("train_path", "tokenizer_path"):
    checked.data[key] = checked.data[key] or "(not needed to plan)"
  config.validate(checked)
  if cfg.data.train_path and not cfg.data.tokenizer_path:
    raise LimaError("data.tokenizer_path: is empty; planning from data.train_path needs the "
                    "tokenizer (or pass --num_examples)")


def _source(cfg) -> tuple[dict, bool] | None:
  """(fields, whether its rows hold EOT) of init_from, from an HF config.json alone (no weight
  file needed), a Meta directory or one of ours; None without init_from."""
  if not cfg.init_from:
    return None
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(cfg.init_from):
    raise LimaError(f"init_from: {cfg.init_from}: no such directory")
  fields, _, has_eot = pretrained.source_info(cfg.init_from, config_only=True)
  return fields, has_eot


def _fake_devices(count: int) -> list:
  """`count` of this process's CPU devices (the CLI asks JAX for exactly that many)."""
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise LimaError(f"--topology: needs {count} fake CPU devices, but JAX already started with "
                    f"{len(devices)} in this process; run the plan in a fresh process")
  return devices[:count]


def _load_examples(cfg, tokenizer) -> list:
  with tempfile.TemporaryDirectory() as tmp:  # the TFDS copy is thrown away
    return data.load_examples(cfg.data.train_path, tokenizer, max_length=cfg.data.max_length,
                              train_on_prompt=cfg.data.train_on_prompt, data_dir=tmp)


def _layout(cfg, examples, epochs, total_steps, mesh, avg_tokens):
  """(the batch layout training will use, the rows a step computes on average, where the
  numbers came from). A step computes only the micro-batches its examples fill."""
  length = cfg.data.max_length
  if examples is not None:
    needed = [data.rows_needed([counts], length)
              for counts in train.step_token_counts(examples, epochs, range(total_steps))]
    # The worst step's rows, counted once here rather than again by step_layout.
    layout = train.step_layout(cfg, [], mesh, cfg.data.rows_per_step or max(needed))
    used = [math.ceil(rows / layout.rows) for rows in needed]
    source = ("data.rows_per_step" if cfg.data.rows_per_step
              else "the worst step of data.train_path")
    return layout, layout.rows * sum(used) / len(used), source
  if cfg.data.rows_per_step:
    layout = train.step_layout(cfg, [], mesh, cfg.data.rows_per_step)
    return layout, layout.micro_batches * layout.rows, "data.rows_per_step"
  if avg_tokens < 1:
    raise LimaError(f"--avg_tokens: must be positive, got {avg_tokens}")
  needed = math.ceil(cfg.train.batch_size * min(avg_tokens, length) / length)
  layout = train.step_layout(cfg, [], mesh, needed)
  return layout, layout.micro_batches * layout.rows, (
      f"assumed: {cfg.train.batch_size} examples x ~{avg_tokens} tokens / {length} = {needed} "
      "rows; the real count depends on the data (set data.rows_per_step, or data.train_path to "
      "count it)")


def _abstract_batch(trainer: Trainer, layout: data.StepLayout) -> dict:
  empty = data.pack_step([], 1, layout.length)  # the dtypes training feeds
  return {k: jax.ShapeDtypeStruct(layout.shape, empty[k].dtype, sharding=trainer.batch_sharding)
          for k in BATCH_KEYS}


def _model_flops(trainer: Trainer, rows: float, length: int, backward: bool = True) -> float:
  """Model FLOPs of a step computing `rows` packed rows (padding included: it is computed);
  backward=False: the forward pass alone (the dev loss).

  Per token of context T, as in the usual MFU definition (Kaplan et al. 2020, arXiv:2001.08361,
  section 2.1; PaLM, arXiv:2204.02311, appendix B): the forward pass costs 2 per matmul weight
  and 4 L d T for the attention scores. The backward pass computes every matmul's input
  gradient, as much again (twice for the attention scores, both of whose operands are
  activations), and every trained weight's gradient, as much again: 6N + 12 L d T in all for
  full fine-tuning. With LoRA only the adapters train: the frozen base's weight gradients are
  never computed, so 4 per base weight and 6 per adapter weight (Hu et al. 2021,
  arXiv:2106.09685, section 4.2, measured 25% faster training on GPT-3 175B for this reason).
  Remat's recomputation is not counted. XLA's cost analysis is not used: it counts the scanned
  layer once, not once per layer.
  """
  cfg = trainer.model_cfg
  params = trainer.abstract_state["params"]
  matmul = trainer.num_params - (0 if cfg.tie_embeddings else params["embed"].size)
  trained = trainer.num_trainable if trainer.uses_lora else matmul
  tokens = rows * length
  weights = 2.0 * matmul * tokens
  attention = 4.0 * cfg.n_layers * cfg.d_model * length * tokens
  if not backward:
    return weights + attention
  return 2.0 * weights + 3.0 * attention + 2.0 * trained * tokens


def _assumptions() -> wall_time.Assumptions:
  for flag in (_READ, _WRITE, _D2H):
    if flag.value <= 0:
      raise LimaError(f"--{flag.name}: must be positive, got {flag.value}")
  if _DEV.value < 0:
    raise LimaError(f"--dev_prompts: must be >= 0, got {_DEV.value}")
  source = 0.0 if _SOURCE.value == "none" else float(jax.numpy.dtype(_SOURCE.value).itemsize)
  return wall_time.Assumptions(read_Bps=_READ.value * 1e9, write_Bps=_WRITE.value * 1e9,
                               d2h_Bps=_D2H.value * 1e9, source_bytes_per_param=source,
                               dev_prompts=_DEV.value)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet_logs()
  # The plan compiles for fake CPU devices even on a TPU host.
  jax.config.update("jax_platforms", "cpu")
  cfg = config_cli.load_config()  # first: --show_config needs no topology
  if not _TOPOLOGY.value:
    fail("--topology: required, e.g. --topology=v5p-32 (v4-N, v5e-N, v5p-N, v6e-N, cpu:N)")
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    topo = topology.parse(_TOPOLOGY.value)
    use_fake_cpu_devices(topo.devices)
    if _NUM_EXAMPLES.value is not None and _NUM_EXAMPLES.value < 1:
      raise LimaError(f"--num_examples: must be positive, got {_NUM_EXAMPLES.value}")
    if _VOCAB.value < 0:
      raise LimaError(f"--vocab_size: must be positive (0 = from the tokenizer), got {_VOCAB.value}")
    if not 0 < _MFU.value <= 1:
      raise LimaError(f"--mfu: must be in (0, 1], got {_MFU.value}")
    report = plan_run(cfg, topo, num_examples=_NUM_EXAMPLES.value, avg_tokens=_AVG_TOKENS.value,
                      vocab_size=_VOCAB.value, mfu=_MFU.value, assume=_assumptions(),
                      compile_s=None if _COMPILE.value < 0 else _COMPILE.value)
    tips = [] if report["fits"] else plan_report.advice(report, cfg, topo)
  except LimaError as e:
    fail(str(e))
  report["config"] = name
  if _JSON.value:
    print(json.dumps(dict(report, advice=tips)))
  else:
    print(plan_report.render(report, name))
  if tips:
    print(plan_report.does_not_fit(report, topo, tips), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=config_cli.parse_flags)
