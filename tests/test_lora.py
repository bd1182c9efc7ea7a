"""LoRA training: the base stays frozen bit for bit, the adapters start as a no-op and learn, and
a LoRA workdir resumes exactly and refuses a rerun with other adapters."""

import os
import subprocess

import jax
import numpy as np
import pytest

from helpers import ROOT, final_params, run_and_kill, train_cli, tree_hashes
from lima_jax import config, generate, lora, run_files, select, sharding, train
from lima_jax.errors import LimaError

# A tiny LoRA run: 2 epochs of 9 steps, an interval checkpoint every 2 steps (kills land near
# checkpoint writes), adapter dropout on so the resumed run must repeat its masks too.
FLAGS = ["--config.train.epochs=2", "--config.train.batch_size=8", "--config.data.max_length=64",
         "--config.model.n_layers=2", "--config.model.d_model=64", "--config.model.ffn_dim=128",
         "--config.eval.generate_epochs=(2,)", "--config.checkpoint.every_steps=2",
         "--config.lora.rank=4", "--config.lora.dropout=0.1", "--config.optimizer.warmup_steps=0",
         "--config.data.dev_path="]


def cli_config(**lora_values):
  """The same run as FLAGS, built in-process; `lora_values` override the lora section."""
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.train.epochs, cfg.train.batch_size, cfg.data.max_length = 2, 8, 64
  cfg.model.n_layers, cfg.model.d_model, cfg.model.ffn_dim = 2, 64, 128
  cfg.eval.generate_epochs = (2,)
  cfg.checkpoint.every_steps = 2
  cfg.optimizer.warmup_steps = 0
  cfg.data.dev_path = ""
  cfg.lora.rank, cfg.lora.dropout = 4, 0.1
  for key, value in lora_values.items():
    cfg.lora[key] = value
  return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: its workdir and final adapters."""
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  train.run(cli_config(), workdir)
  return workdir, final_params(cli_config(), workdir)


def batch_of(setup, step):
  return setup.trainer.put_batch(
      setup.layout.pack([setup.examples[i] for i in setup.plan.example_ids(step)]))


def test_the_first_step_sees_the_base_model_and_only_the_adapters_train(tmp_path):
  """B starts at zero, so the LoRA model's logits are the base model's bit for bit; training
  moves the adapters and leaves every base param bit-identical. The reference moves: the same
  check with nonzero B fails, and the adapters do change."""
  setup = train.prepare(cli_config(), str(tmp_path / "lora"))
  base_setup = train.prepare(cli_config(rank=0), str(tmp_path / "full"))
  trainer = setup.trainer
  state = trainer.init(0)
  base_params = base_setup.trainer.init(0)["params"]
  # The seed gives the same base with or without adapters.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(lora.frozen(state["params"])),
               jax.device_get(base_params))
  batch = jax.tree.map(lambda x: x[0], batch_of(setup, 0))

  def forward(t, params):
    # As the train step runs it: activations constrained on the mesh.
    constrain = sharding.Constrainer(t.mesh)
    return jax.jit(lambda p: t.model(p)(batch["tokens"], batch["positions"],
                                        batch["segment_ids"], constrain=constrain))(params)

  np.testing.assert_array_equal(forward(trainer, state["params"]),
                                forward(base_setup.trainer, base_params))
  nonzero_b = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, state["params"])
  assert not np.array_equal(forward(trainer, nonzero_b), forward(trainer, state["params"]))

  # The optimizer state covers the adapters alone.
  opt_leaves = jax.tree.leaves(state["opt_state"])
  assert sum(x.size for x in opt_leaves) < 3 * trainer.num_trainable + 10
  before = jax.device_get(state["params"])
  for step in range(3):
    state, metrics = trainer.train_step(state, batch_of(setup, step))
    assert np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state["params"])
  jax.tree.map(np.testing.assert_array_equal, lora.frozen(after), lora.frozen(before))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora.adapters(after)),
                                                    jax.tree.leaves(lora.adapters(before)))]
  assert all(moved)


def test_a_lora_workdir_holds_adapters_alone_and_generates_with_them(reference, tmp_path):
  workdir, adapters = reference
  # Checkpoints and the selection export hold the adapters, never the base.
  assert jax.tree.structure(adapters) == jax.tree.structure(lora.adapters(adapters))
  kept = run_files.locate(workdir, epoch=2)
  source, tokenizer = generate.open_kept(kept)
  trainer, params = generate.restore_kept(kept, source)
  assert trainer.uses_lora
  # The base comes back from the run's seed, the adapters from the export.
  base = lora.frozen(jax.device_get(trainer.init(0)["params"]))
  jax.tree.map(np.testing.assert_array_equal, lora.frozen(jax.device_get(params)), base)
  jax.tree.map(np.testing.assert_array_equal, lora.adapters(jax.device_get(params)), adapters)
  out = tmp_path / "answers.jsonl"
  generate.main(["--workdir", workdir, "--epoch", "2", "--prompts",
                 config.sample_data("dev.jsonl"), "--out", str(out), "--greedy",
                 "--max_tokens", "8"])
  assert len(out.read_text().splitlines()) == 14


def test_sigkill_then_rerun_ends_bit_identical_to_an_uninterrupted_lora_run(reference, tmp_path):
  """Killed once a checkpoint exists, while the next one is being written, the rerun resumes
  from a checkpoint (the base reloaded, the adapters restored) and ends with the adapters of the
  uninterrupted run."""
  _, want = reference
  workdir = str(tmp_path)
  proc = train_cli(*FLAGS, f"--workdir={workdir}", "--config.train.stop_after_steps=4",
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
  assert run_and_kill(FLAGS, workdir, during_checkpoint_write=True)
  finish = train_cli(*FLAGS, f"--workdir={workdir}", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
  out, err = finish.communicate(timeout=300)
  assert finish.returncode == 0, err[-2000:]
  assert "resuming at step" in out, out
  jax.tree.map(np.testing.assert_array_equal, final_params(cli_config(), workdir), want)


@pytest.mark.parametrize("change, named", [({"rank": 8}, "lora.rank=4"),
                                            ({"rank": 0}, "lora.rank=4"),
                                            ({"targets": "q,v"}, "lora.targets"),
                                            ({"seed_base": True}, "seed")])
def test_a_rerun_with_other_adapters_or_base_is_refused_and_harms_nothing(reference, change,
                                                                          named):
  workdir, _ = reference
  before = tree_hashes(os.path.join(workdir, "checkpoints"))
  cfg = cli_config(**{k: v for k, v in change.items() if k != "seed_base"})
  if "seed_base" in change:
    cfg.seed = 1
  with pytest.raises(LimaError, match=named):
    train.run(cfg, workdir)
  assert tree_hashes(os.path.join(workdir, "checkpoints")) == before


def test_bad_lora_settings_name_their_key():
  for key, value, words in (("rank", -1, "lora.rank"), ("alpha", 0.0, "lora.alpha"),
                            ("dropout", 1.0, "lora.dropout"), ("targets", "q,w", "lora.targets")):
    cfg = cli_config(**{key: value})
    with pytest.raises(LimaError, match=words):
      config.validate(cfg)


def test_a_toy_lora_run_on_a_pretrained_toy_halves_its_train_loss(tmp_path):
  """LoRA adapts a pretrained model: a tiny model fully trained on the sample train set, then
  LoRA on the dev set it has not seen (rank 8, every projection). Its train loss falls by half,
  as the toy's does. On a random-init base it could not: the frozen LM head (std 0.02) and
  final norm cap any logit at 0.02 * d_model, so the loss stays near log(vocabulary) - 1.3."""
  base_cfg = cli_config(rank=0)
  base_cfg.train.epochs, base_cfg.eval.generate_epochs = 20, (20,)
  base_cfg.checkpoint.every_steps = 0
  train.run(base_cfg, str(tmp_path / "base"))
  select.choose(str(tmp_path / "base"), 20, str(tmp_path / "base_export"), "orbax")

  cfg = cli_config(rank=8, dropout=0.0)
  cfg.init_from = str(tmp_path / "base_export")
  cfg.data.train_path = config.sample_data("dev.jsonl")
  cfg.train.epochs, cfg.eval.generate_epochs = 30, ()
  cfg.checkpoint.every_steps = 0
  workdir = str(tmp_path / "lora")
  train.run(cfg, workdir)
  steps, epochs = run_files.read_metrics(workdir)
  assert epochs[-1]["loss"] < steps[0]["loss"] / 2, (steps[0]["loss"], epochs[-1]["loss"])


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "configs"))
                                        if n.endswith(".py")))
def test_every_preset_loads_and_the_lora_presets_freeze_a_bf16_base(name):
  """Each config file builds, its lora section parses; the *_lora presets train adapters on a
  bf16 base at a peak LR ten times their end LR (LIMA's decay), the others every weight."""
  cfg = config.from_file(os.path.join(ROOT, "configs", name))
  fields = lora.fields(cfg.lora)
  if name.endswith("_lora.py"):
    assert fields["lora_rank"] > 0 and cfg.model.param_dtype == "bfloat16"
    assert cfg.optimizer.learning_rate == pytest.approx(10 * cfg.optimizer.end_learning_rate)
  else:
    assert fields["lora_rank"] == 0
