"""`python -m lima_jax.plan`: the real train step compiled for a topology's fake devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lima_jax import config, data, plan, plan_report, sharding, topology, train, wall_time
from lima_jax.errors import LimaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset(name):
  return config.from_file(os.path.join(ROOT, "configs", f"{name}.py"))


def small_lima():
  """lima_65b's recipe on a model small enough to compile in seconds."""
  cfg = preset("lima_65b")
  cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 256, 4, 4
  cfg.model.n_kv_heads, cfg.model.ffn_dim = 4, 512
  cfg.data.max_length = 1024
  return cfg


def test_topology_names_count_chips():
  assert [topology.parse(n).devices for n in ("v4-8", "v4-128", "v5p-32", "v5e-16",
                                              "v5litepod-8", "v6e-4", "cpu:8")] == [4, 64, 16, 16,
                                                                                    8, 4, 8]
  assert topology.parse("v5p-32").hbm_bytes == 95 * topology.GIB
  assert topology.parse("v5litepod-8").name == "v5e-8"
  for bad in ("v4-12", "v5e-2", "v9-8", "v5p", "cpu:0", "gpu:8"):
    with pytest.raises(LimaError, match="--topology"):
      topology.parse(bad)
  assert topology.slice_for(topology.parse("v4-8"), 41) == "v4-128"
  assert topology.slice_for(topology.parse("v5e-4"), 5) == "v5e-8"


@pytest.mark.parametrize("name, dims", [
    ("lima_13b", (5120, 40, 40, 40, 13824, 10_000.0, 1e-6)),
    ("lima_33b", (6656, 60, 52, 52, 17920, 10_000.0, 1e-6)),
    ("llama2_7b", (4096, 32, 32, 32, 11008, 10_000.0, 1e-5)),
    ("llama3_8b", (4096, 32, 32, 8, 14336, 500_000.0, 1e-5)),
    ("llama31_8b", (4096, 32, 32, 8, 14336, 500_000.0, 1e-5)),
])
def test_presets_smaller_than_65b_follow_the_paper(name, dims):
  cfg = preset(name)
  m = cfg.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.rope_theta,
          m.norm_eps) == dims
  assert (cfg.train.batch_size, m.residual_dropout_top, cfg.train.epochs) == (64, 0.2, 15)
  assert cfg.data.max_length == (4096 if name == "llama2_7b" else 2048)
  assert m.remat in config.REMAT_POLICIES and cfg.mesh.fsdp == -1
  plan._validate(cfg)  # pylint: disable=protected-access


def test_llama31_presets_scale_rope_as_llama31_does():
  for name in ("llama31_8b", "llama31_70b"):
    m = preset(name).model
    assert (m.rope_scaling_type, m.rope_scaling_factor, m.rope_scaling_low_freq_factor,
            m.rope_scaling_high_freq_factor, m.rope_scaling_original_max_position) == (
                "llama3", 8.0, 1.0, 4.0, 8192), name
  assert preset("llama3_8b").model.rope_scaling_type == "default"
  cfg = preset("llama31_70b")  # LIMA's 65B recipe on LLaMA-3.1-70B's dimensions
  m = cfg.model
  assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.rope_theta,
          m.norm_eps, m.tie_embeddings) == (8192, 80, 64, 8, 28672, 500_000.0, 1e-5, False)
  assert (cfg.train.batch_size, m.residual_dropout_top, cfg.train.epochs) == (32, 0.3, 15)
  plan._validate(cfg)  # pylint: disable=protected-access


def test_lima_recipe_counts_steps_lr_and_dropout():
  report = plan.plan_run(small_lima(), topology.parse("cpu:8"), num_examples=1000)
  assert report["params"] > 0 and report["fits"]
  assert (report["steps_per_epoch"], report["total_steps"]) == (32, 480)
  lrs = report["lr_at_epoch_end"]
  # The LR of each epoch's last step (31, 63, ..., 479): 1e-5 - 9e-6 * step / 479, so the last
  # epoch ends exactly at end_learning_rate (the step after the last one, 480, gave 9.4e-6 first).
  assert lrs == pytest.approx([1e-5 - 9e-6 * (32 * e - 1) / 479 for e in range(1, 16)])
  assert lrs[-1] == np.float32(1e-6)
  assert report["dropout_per_layer"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
  # 32 examples x ~750 tokens fill 24 rows of 1024: 3 micro-batches of one row per batch shard.
  assert report["rows_per_step"] == 24 and report["rows_source"].startswith("assumed")
  assert (report["micro_batches"], report["micro_batch_rows"]) == (3, 8)
  assert 0 < report["bytes_per_device"] <= report["hbm_bytes_per_device"]
  assert report["bytes_per_device"] >= report["argument_bytes"] + report["temp_bytes"]
  assert report["step_time_s"] is None  # no peak FLOP/s for a CPU


def test_planning_from_data_counts_the_micro_batches_each_step_fills():
  cfg = small_lima()
  cfg.data.train_path = config.sample_data("train.jsonl")
  cfg.data.tokenizer_path = config.sample_data("tokenizer.model")
  cfg.data.max_length, cfg.train.batch_size = 256, 8
  report = plan.plan_run(cfg, topology.parse("cpu:8"))
  assert report["num_examples"] == 71 and report["rows_source"].startswith("the worst step")
  # The same layout and per-step rows as training computes them, by the trainer's own code.
  tokenizer = data.load_tokenizer(cfg.data.tokenizer_path)
  examples = plan._load_examples(cfg, tokenizer)  # pylint: disable=protected-access
  epochs = data.EpochPlan(len(examples), cfg.train.batch_size, cfg.seed)
  counts = train.step_token_counts(examples, epochs, range(report["total_steps"]))
  layout = train.step_layout(cfg, counts, sharding.make_mesh(1, -1, 1, jax.devices()[:8]))
  assert (report["micro_batches"], report["micro_batch_rows"]) == (layout.micro_batches, 8)
  computed = [-(-data.rows_needed([c], 256) // 8) * 8 for c in counts]
  assert report["mean_rows_computed"] == pytest.approx(sum(computed) / len(computed))
  assert report["mean_rows_computed"] <= layout.micro_batches * layout.rows


def test_a_dimension_that_does_not_divide_its_mesh_axis_is_refused():
  cfg = preset("lima_33b")  # 52 heads
  cfg.mesh.fsdp, cfg.mesh.tensor = 1, 8
  with pytest.raises(LimaError, match=r"model\.n_(kv_)?heads.*52.*tensor=8"):
    plan.plan_run(cfg, topology.parse("cpu:8"), num_examples=1000)


def test_65b_does_not_fit_a_v4_8_and_the_advice_says_what_to_change():
  cfg = preset("lima_65b")
  cfg.train.micro_batch_rows = -1  # a whole step at once
  topo = topology.parse("v4-8")
  report = plan.plan_run(cfg, topo, num_examples=1000)
  assert not report["fits"] and report["bytes_per_device"] > 32 * topology.GIB
  tips = plan_report.advice(report, cfg, topo)
  assert "more fsdp" in tips[0] and "--topology=v4-" in tips[0]
  assert any("micro_batch_rows=0" in tip for tip in tips)


def test_a_topology_larger_than_the_started_backend_is_refused():
  with pytest.raises(LimaError, match="fresh process"):
    plan.plan_run(small_lima(), topology.parse("cpu:16"), num_examples=1000)


def test_cli_plans_65b_on_v5p_32_as_json():
  env = dict(os.environ, XLA_FLAGS="")  # the plan sets its own device count
  result = subprocess.run(
      [sys.executable, "-m", "lima_jax.plan", "--config=configs/lima_65b.py",
       "--topology=v5p-32", "--num_examples=1000", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report["fits"] and report["devices"] == 16
  assert (report["steps_per_epoch"], report["total_steps"]) == (32, 480)
  assert report["params"] == pytest.approx(65.3e9, rel=0.01)
  assert len(report["lr_at_epoch_end"]) == 15 and len(report["dropout_per_layer"]) == 80
  assert report["dropout_per_layer"][-1] == pytest.approx(0.3)
  assert report["hbm_bytes_per_device"] == 95 * topology.GIB
  assert report["step_time_s"] > 0
  # The whole run's wall time: every part, adding up, and within the goal at the defaults.
  w = report["wall_time"]
  parts = ("weights_load_s", "compile_s", "steps_s", "epoch_end_s", "checkpoint_s")
  assert all(w[k] > 0 for k in parts)
  assert w["total_s"] == pytest.approx(sum(w[k] for k in parts))
  assert w["steps_s"] == pytest.approx(report["compute_time_s"])
  assert w["non_compute_share"] == pytest.approx(1 - w["steps_s"] / w["total_s"])
  assert w["non_compute_share"] <= 0.25
  # fp32 params plus two fp32 Adam moments: about 784 GB; the params alone, 261 GB.
  assert report["checkpoint_bytes"]["full_state"] == pytest.approx(12 * report["params"], rel=1e-3)
  assert report["checkpoint_bytes"]["params_export"] == 4 * report["params"]
  # 130 GB of bf16 weights read by 4 hosts at 2 GB/s each.
  assert report["assumptions"]["hosts"] == 4
  assert w["weights_load_s"] == pytest.approx(2 * report["params"] / (4 * 2e9))


def test_cli_plans_65b_lora_on_a_quarter_of_the_full_fine_tunes_slice():
  """configs/lima_65b_lora.py fits a v5p-8, where the full fine-tune (v5p-32) does not; the plan
  counts a LoRA state: adapters and their AdamW moments in fp32 beside a bf16 base."""
  env = dict(os.environ, XLA_FLAGS="")  # the plan sets its own device count
  runs = {name: subprocess.run(
      [sys.executable, "-m", "lima_jax.plan", f"--config=configs/{name}.py", "--topology=v5p-8",
       "--num_examples=1000", "--json"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
          for name in ("lima_65b_lora", "lima_65b")}
  assert runs["lima_65b"].returncode == 1, runs["lima_65b"].stderr[-3000:]
  assert "does not fit v5p-8" in runs["lima_65b"].stderr
  assert runs["lima_65b_lora"].returncode == 0, runs["lima_65b_lora"].stderr[-3000:]
  report = json.loads(runs["lima_65b_lora"].stdout)
  assert report["fits"] and report["devices"] == 4
  assert report["lora"] == {"rank": 64, "alpha": 16.0, "dropout": 0.05, "token_rows": 1,
                            "targets": ["q", "k", "v", "o", "gate", "up", "down"]}
  # Rank 64 on the seven projections of 80 layers: 64 x (in + out) each; and LIMA's new EOT's
  # embedding row and LM-head column (LLaMA has no EOT), which train too.
  d, f = 8192, 22016
  adapters = 80 * 64 * (4 * 2 * d + 3 * (d + f))
  trained = adapters + 2 * d
  assert report["trainable_params"] == trained < report["params"] / 50
  base = report["params"] - adapters  # the EOT rows are part of the base's tables
  tables = 2 * 32_128 * d  # the embedding and LM head, kept in fp32 since rows of them train
  state = report["state_bytes_per_device"]
  # bf16 over fsdp=4, but for the fp32 tables
  assert state["frozen_params"] == pytest.approx((2 * base + 2 * tables) / 4, rel=0.002)
  assert state["opt_state"] == pytest.approx(2 * state["trained_params"], rel=0.01)
  # Adapters shard over fsdp like the base (none is whole on a chip): fp32 over fsdp=4.
  assert state["trained_params"] == pytest.approx(4 * trained / 4, rel=0.01)
  # XLA:CPU's f32 copy of the bf16 base is found and left out of the fit.
  assert report["cpu_upcast_bytes"] == pytest.approx(2 * 2 * (base - tables) / 4, rel=0.01)
  assert report["bytes_per_device"] < report["argument_bytes"] + report["temp_bytes"]
  # Checkpoints hold the adapters and EOT rows, two fp32 moments and the step; exports those;
  # the start reads the bf16 base.
  assert report["checkpoint_bytes"]["full_state"] == pytest.approx(12 * trained, rel=1e-3)
  assert report["checkpoint_bytes"]["params_export"] == 4 * trained
  assert report["load_bytes"] == 2 * (report["params"] - trained)
  text = plan_report.render(report, "configs/lima_65b_lora.py")
  for piece in ("LoRA adapters of rank 64 (alpha 16, dropout 0.05) on q,k,v,o,gate,up,down "
                "and the embedding and LM-head rows of 1 added token (a new EOT)",
                "adapters and token rows (float32)",
                "frozen base (bfloat16)", "15 adapter states of 9.6 GB",
                "6 adapter exports of 3.2 GB", "of frozen base weights"):
    assert piece in text, piece


def test_lora_flops_leave_out_the_frozen_weights_gradients():
  """6 FLOPs per weight and token for full fine-tuning, 4 per frozen weight and 6 per adapter
  weight with LoRA (no weight gradient for the base); treating the base as trained fails this."""
  full = plan.plan_run(small_lima(), topology.parse("cpu:8"), num_examples=1000)
  cfg = small_lima()
  cfg.lora.rank, cfg.model.param_dtype = 8, "bfloat16"
  lora = plan.plan_run(cfg, topology.parse("cpu:8"), num_examples=1000)
  m, tokens = full["model"], full["mean_rows_computed"] * full["max_length"]
  attention = 12 * m["n_layers"] * m["d_model"] * full["max_length"] * tokens
  embed = 32_128 * m["d_model"]  # the padded vocabulary's rows are not a matmul
  matmul = full["params"] - embed
  trained = lora["trainable_params"]  # the adapters, and the new EOT's two rows of d_model
  adapters = trained - 2 * m["d_model"]
  assert lora["lora"]["token_rows"] == 1
  assert lora["params"] == full["params"] + adapters
  assert full["flops_per_step"] == pytest.approx(6 * matmul * tokens + attention)
  # 4 per frozen or adapter weight (forward, input gradient), 2 more per trained weight
  assert lora["flops_per_step"] == pytest.approx(4 * (matmul + adapters) * tokens
                                                 + 2 * trained * tokens + attention)
  assert lora["flops_per_step"] < full["flops_per_step"]


def test_cli_errors_are_one_line():
  result = subprocess.run([sys.executable, "-m", "lima_jax.plan", "--topology=v5p-33"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --topology: v5p-33: v5p slices come in sizes a multiple of 8"]


def test_cli_shows_what_the_chunked_loss_saves_on_a_llama3_vocabulary():
  """llama3_8b.py's 128,257-column vocabulary on a model small enough to compile quickly: the
  unchunked step holds each chip's [1 row, 512, 128,384] fp32 logits (251 MiB) and their
  gradient; 128-position chunks hold a quarter of that."""
  reports = {}
  for chunk in (0, 128):
    result = subprocess.run(
        [sys.executable, "-m", "lima_jax.plan", "--config=configs/llama3_8b.py",
         "--topology=v5p-8", "--vocab_size=128257", f"--config.train.loss_chunk_tokens={chunk}",
         "--config.model.d_model=128", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
         "--config.model.ffn_dim=256", "--config.model.n_layers=1",
         "--config.data.max_length=512", "--config.train.batch_size=8", "--json"],
        cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
        timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    reports[chunk] = json.loads(result.stdout)
  assert reports[128]["loss_chunk_tokens"] == 128 and reports[128]["micro_batch_rows"] == 4
  logits = 512 * 128_384 * 4  # one row per chip
  saved = reports[0]["temp_bytes"] - reports[128]["temp_bytes"]
  assert saved > 1.5 * logits, (reports[0]["temp_bytes"], reports[128]["temp_bytes"])


def test_hosts_and_bandwidths_of_the_topologies():
  v5p = topology.parse("v5p-32")
  assert (v5p.hosts, v5p.hbm_bandwidth, v5p.host_memory) == (4, 2765e9, 448e9)
  assert topology.parse("v5e-8").hosts == 1 and topology.parse("v5e-16").hosts == 4
  assert topology.parse("v6e-8").host_memory == 1440e9
  assert topology.parse("v4-128").hosts == 16


def lima_65b_run(**changes):
  """A Run shaped like LLaMA-65B's on a v5p-32 (round numbers)."""
  fields = dict(hosts=4, devices=16, host_memory=448 * 10**9, hbm_Bps=2765e9, steps_per_epoch=32,
                epochs=15, step_s=4.5, compile_s=100.0, params=65 * 10**9,
                full_state_bytes=780 * 10**9, export_bytes=260 * 10**9, dev_loss_flops=3e16,
                flops_per_s=16 * 459e12 * 0.4, decode_weight_bytes=130 * 10**9,
                kv_bytes_per_slot=2 * 80 * 8192 * 2, generate_batch=16, generate_batches=4,
                decode_steps=2047)
  fields.update(changes)
  return wall_time.Run(**fields)


def test_wall_time_of_checkpoint_policies():
  run, a = lima_65b_run(), wall_time.Assumptions()
  epochs = (5, 6, 7, 8, 9, 10)
  split = {policy: wall_time.simulate(run, a, wall_time.Policy(policy, export_epochs=epochs))
           for policy in ("always", "when_idle", "never")}
  # 195 GB per host at 1 GB/s: longer than an epoch's 144 s of steps, so 'always' waits at
  # every epoch end; 'when_idle' writes only when no write is in flight (the 65 GB exports of
  # epochs 5-10 included: none then), 'never' only at the end: epochs 1, 3, 11, 13 and 15.
  assert [split[p]["saves"]["full_state"] for p in ("always", "when_idle", "never")] == [15, 5, 1]
  assert split["always"]["checkpoint_s"] > 3 * split["when_idle"]["checkpoint_s"]
  # What remains of when_idle is about the last save's write (195 s), which nothing overlaps.
  assert 195 <= split["when_idle"]["checkpoint_s"] < 1.1 * split["never"]["checkpoint_s"] + 10
  assert split["always"]["saves"]["params_export"] == 6
  # Fast enough storage hides every epoch-end write behind the next epoch's steps.
  fast = wall_time.simulate(run, wall_time.Assumptions(write_Bps=4e9),
                            wall_time.Policy("always", export_epochs=epochs))
  # What waits: each save's copy to host memory (a host's 4 chips at 32 GB/s each) and the
  # last write.
  copies = (15 * 195 + 6 * 65) / (4 * 32)
  assert fast["saves"]["full_state"] == 15
  assert fast["checkpoint_s"] == pytest.approx(copies + 195 / 4, rel=1e-3)
  # A synchronous save (no async, or more bytes per host than its RAM) waits for its write.
  sync = wall_time.simulate(run, a, wall_time.Policy("always", async_save=False,
                                                     export_epochs=epochs))
  small = wall_time.simulate(lima_65b_run(host_memory=100 * 10**9), a,
                             wall_time.Policy("always", export_epochs=epochs))
  writes = 15 * 195 + 6 * 65
  assert sync["checkpoint_s"] == pytest.approx(writes, rel=0.01)
  assert small["checkpoint_s"] > 15 * 195


def test_wall_time_of_the_epoch_end_and_the_start():
  run, a = lima_65b_run(), wall_time.Assumptions()
  policy = wall_time.Policy(export_epochs=(5, 6))
  # A decode step reads 130 GB of weights and 16 rows x (128 + 2047) slots of KV cache over
  # 16 chips' HBM.
  cache = 2 * 80 * 8192 * 2 * 16 * (128 + 2047)
  step = (130e9 + cache) / 16 / 2765e9
  assert wall_time.decode_step_s(run, 128) == pytest.approx(step)
  dev_loss, generations = wall_time.epoch_end_s(run, a, policy)
  assert generations == pytest.approx(4 * 2047 * step)
  assert dev_loss == pytest.approx(3e16 / (16 * 459e12 * 0.4))
  out = wall_time.wall_time(run, a, policy)["wall_time"]
  assert out["epoch_end_s"] == pytest.approx(15 * dev_loss + 2 * generations)
  assert out["weights_load_s"] == pytest.approx(65e9 * 2 / (4 * 2e9))
  no_dev = wall_time.wall_time(run, wall_time.Assumptions(dev_prompts=0,
                                                           source_bytes_per_param=0), policy)
  assert no_dev["wall_time"]["epoch_end_s"] == 0 and no_dev["wall_time"]["weights_load_s"] == 0


def test_the_report_prints_each_part_and_its_share():
  report = {"wall_time": {"weights_load_s": 16.0, "compile_s": 120.0, "steps_s": 2175.0,
                          "epoch_end_s": 272.0, "checkpoint_s": 211.0, "total_s": 2794.0,
                          "non_compute_share": 0.2215},
            "checkpoint_bytes": {"full_state": 783e9, "params_export": 261e9},
            "load_bytes": 2 * 65.3e9,
            "assumptions": {"read_gb_per_s": 2.0, "write_gb_per_s": 1.0, "d2h_gb_per_s": 32.0,
                            "source_bytes_per_param": 2.0, "dev_prompts": 50, "hosts": 4},
            "wall_time_detail": {"saves": {"full_state": 8, "params_export": 6},
                                 "dev_loss_s_per_epoch": 1.7, "generations_s_per_epoch": 41.0,
                                 "decode_step_s": 0.005},
            "params": 65.3e9, "total_steps": 480, "mfu": 0.4}
  text = "\n".join(plan_report.render_wall_time(report))
  for piece in ("22% of it besides the steps", "16 s    1%", "2175 s   78%", "272 s   10%",
                "8 full states of 783 GB", "6 params exports of 261 GB", "5.0 ms"):
    assert piece in text, piece
