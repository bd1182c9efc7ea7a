"""The benchmark suite's own logic at tiny sizes: the FLOPs formula, packing efficiency, and
that the remat policies change memory but not the step's loss or gradients.

Timings are not tested here (they are machine noise); `python bench/run.py` measures them.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import common  # noqa: E402  pylint: disable=wrong-import-position
import flops  # noqa: E402  pylint: disable=wrong-import-position
import packing_efficiency  # noqa: E402  pylint: disable=wrong-import-position
import remat  # noqa: E402  pylint: disable=wrong-import-position
import run  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def tiny():
  from lima_jax import sharding  # pylint: disable=import-outside-toplevel
  cfg, model_cfg = common.model_setup(n_layers=2, d_model=64, n_heads=4, ffn_dim=96)
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return model_cfg, common.make_trainer(cfg, model_cfg, mesh)


def test_matmul_params_count_the_models_matmul_weights(tiny):
  model_cfg, trainer = tiny
  params = trainer.abstract_state["params"]
  blocks = params["blocks"]
  counted = sum(int(np.prod(blocks[group][name].shape)) for group, names in
                (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("gate", "up", "down")))
                for name in names)
  # The LM head counts over the real vocabulary only; the embedding is a gather.
  counted += model_cfg.d_model * model_cfg.vocab_size
  assert flops.matmul_params(model_cfg) == counted


def test_train_flops_are_6n_plus_attention(tiny):
  model_cfg, _ = tiny
  n = flops.matmul_params(model_cfg)
  per_token = 6 * n + 12 * 2 * 64 * 128  # layers * (heads * head_dim) * seq_len
  assert flops.train_flops_per_token(model_cfg, 128) == per_token
  assert flops.train_flops(model_cfg, 3, 128) == per_token * 3 * 128


def test_synthetic_batch_is_one_full_example_per_row():
  step = common.synthetic_batch(2, 16, 50)
  assert all(v.shape == (1, 2, 16) for v in step.values())  # one micro-batch of two rows
  batch = {k: v[0] for k, v in step.items()}
  np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
  assert (batch["segment_ids"] == 1).all() and (batch["weights"] == 1).all()
  np.testing.assert_array_equal(batch["positions"][1], np.arange(16))


def test_lima_lengths_are_seeded_trimmed_and_mean_750():
  lengths = packing_efficiency.lima_lengths()
  np.testing.assert_array_equal(lengths, packing_efficiency.lima_lengths())
  assert len(lengths) == 1000 and lengths.min() >= 2 and lengths.max() == 2048
  assert abs(lengths.mean() - 750) < 2
  assert np.median(lengths) < lengths.mean()  # a long tail


def test_efficiency_of_examples_that_pack_exactly():
  # Four examples of 33 tokens take 32 positions each: two per 64-position row.
  out = packing_efficiency.efficiencies([33] * 4, batch_size=4, epochs=2, max_length=64,
                                        micro_batch_rows=(1, 2))
  assert out["micro_batches_per_step"] == 2 and out["rows_per_step_whole"] == 2
  assert out["packed"] == pytest.approx(1.0) and out["packed_whole_step"] == pytest.approx(1.0)
  assert out["packed_by_micro_batch_rows"] == pytest.approx({"1": 1.0, "2": 1.0})
  assert out["pad_to_max_length"] == pytest.approx(0.5)
  assert out["pad_to_batch_max"] == pytest.approx(1.0)


def test_micro_batches_skip_what_a_light_step_does_not_fill():
  # Five examples of 39 positions, one per 64-position row, four per step: the first step fills
  # four rows, the last one. A whole-step layout computes four rows in both steps; one-row
  # micro-batches compute the five rows that hold tokens.
  out = packing_efficiency.efficiencies([40] * 5, batch_size=4, epochs=1, max_length=64,
                                        micro_batch_rows=(1, 2, 4))
  real = 5 * 39
  assert out["rows_per_step_whole"] == 4
  assert out["packed_whole_step"] == pytest.approx(real / (8 * 64))
  assert out["packed"] == pytest.approx(real / (5 * 64))
  assert out["packed_by_micro_batch_rows"] == pytest.approx(
      {"1": real / (5 * 64), "2": real / (6 * 64), "4": real / (8 * 64)})


def test_table_reports_every_figure():
  share = {"imports": 0.5, "steps": 0.5}
  result = {"mfu_vs_matmul": {"one_device": 0.5, "mesh_8": 0.3, "pytorch_one_device": 0.4,
                              "one_device_scanned": 0.45, "mesh_8_scanned": 0.28},
            "packing_efficiency": {"packed": 0.8, "pad_to_max_length": 0.4,
                                   "pad_to_batch_max": 0.4, "packed_whole_step": 0.6,
                                   "packed_by_micro_batch_rows": {"1": 0.8, "16": 0.7}},
            "compile": {"total_s_80": 2.0, "total_s_2": 1.9}, "compile_ratio_80_vs_2": 1.05,
            "vs_pytorch": 1.2, "startup_share": share, "startup_s": {"imports": 1.0, "steps": 1.0},
            "remat": {"full": {"step_time_vs_none": 1.33, "step_cpu_time_vs_none": 1.3,
                               "temp_memory_vs_none": 0.27, "mfu_vs_matmul": 0.25}},
            "remat_plan": {"lima_7b v5p-8": {"full": {"bytes_per_device": 44 * 2**30}}},
            "elapsed_s": 10.0}
  table = run._table(result)  # pylint: disable=protected-access
  for text in ("0.50", "0.30", "0.45", "0.28", "0.80", "1.05", "1.20", "imports", "1.33", "0.27",
               "full 44"):
    assert text in table


@pytest.fixture(scope="module")
def remat_steps(tiny):
  """Per remat policy: the compiled step's memory, and one step's loss and gradients. The
  optimizer is plain SGD with rate 1, so the step's parameter change is minus the gradient."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  model_cfg, base = tiny
  cfg, _ = common.model_setup(n_layers=2, d_model=64, n_heads=4, ffn_dim=96)
  host_batch = common.synthetic_batch(2, 128, model_cfg.vocab_size)
  out, first = {}, None
  for policy in remat.POLICIES:
    trainer = dataclasses.replace(remat.trainer_for(policy, cfg, model_cfg, base.mesh),
                                  optimizer=optax.sgd(1.0))
    assert trainer.model_cfg.remat == policy
    batch = trainer.put_batch(host_batch)
    first = first or trainer.init(cfg.seed)  # the initial state does not depend on the policy
    state = jax.tree.map(jnp.copy, first)  # the step donates its state
    before = jax.tree.map(np.asarray, state["params"])
    compiled = trainer.train_step.lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, state["params"])
    out[policy] = (remat.memory(compiled), float(metrics["loss"]), grads)
  return out


def test_remat_policies_give_the_same_loss_and_gradients(remat_steps):
  # Remat only trades memory for recomputation (dropout masks included): same step, same result.
  _, loss, grads = remat_steps["none"]
  for policy in ("full", "save_dots"):
    _, other_loss, other_grads = remat_steps[policy]
    assert other_loss == pytest.approx(loss, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 other_grads, grads)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_remat_memory_figure(remat_steps):
  none, full, dots = (remat_steps[p][0] for p in ("none", "full", "save_dots"))
  assert full["temp_bytes"] < dots["temp_bytes"] < none["temp_bytes"]
  # The state and batch are the same whatever the policy.
  assert full["argument_bytes"] == none["argument_bytes"]


def test_remat_table_lines():
  figures = {p: {"step_time_vs_none": t, "step_cpu_time_vs_none": c, "temp_memory_vs_none": m,
                 "mfu_vs_matmul": 0.3}
             for p, t, c, m in (("none", 1.0, 1.0, 1.0), ("full", 1.31, 1.29, 0.25),
                                ("save_dots", 1.07, 1.06, 0.6))}
  plan = {"lima_7b v5p-8": {"none": {"bytes_per_device": 395 * 2**30},
                            "full": {"bytes_per_device": 44 * 2**30}}}
  text = "\n".join(remat.table_lines(figures, plan))
  for piece in ("1.31", "1.29", "0.25", "save_dots", "lima_7b v5p-8", "none 395", "full 44"):
    assert piece in text


# The GPU machine has no tensorflow-datasets, ml-collections or tensorboardX: importing any of
# them (directly or through a lima_jax module) fails there, and here under this shim.
BLOCKED = ("tensorflow_datasets", "ml_collections", "tensorboardX")
SHIM = ("import runpy, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "  sys.modules[name] = None\n"
        "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _without_blocked(*args, timeout=600):
  import subprocess  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (common.REPO, os.environ.get("PYTHONPATH"))
                                        if p))
  return subprocess.run([sys.executable, "-c", SHIM, *args], cwd=common.REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def test_the_shim_blocks_what_the_gpu_machine_lacks(tmp_path):
  probe = tmp_path / "probe.py"
  probe.write_text("import lima_jax.config\n")  # ml_collections
  assert "ml_collections" in _without_blocked(str(probe), timeout=120).stderr


def test_gpu_benchmark_dry_run_builds_compiles_and_reports_every_figure():
  done = _without_blocked(os.path.join(common.BENCH_DIR, "gpu.py"), "--dry-run")
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out["dry_run"] and out["mfu"] is None  # no datasheet peak for a CPU
  assert 0 < out["mfu_vs_matmul"] and out["vs_pytorch"] > 0
  assert set(out["decode_tokens_per_s"]) == {"1", "16"}
  assert all(v > 0 for v in out["decode_tokens_per_s"].values())
  for key in ("between_steps_share", "between_steps_share_synchronous"):
    assert 0 <= out[key] < 1
  assert np.isfinite(out["train"]["loss"]) and np.isfinite(out["loop"]["last_loss"])
  assert out["train"]["params"] > 0 and out["tokens_per_s"]["pytorch"] > 0
