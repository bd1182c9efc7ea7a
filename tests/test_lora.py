"""LoRA training: the base stays frozen bit for bit, the adapters start as a no-op and learn, and
a LoRA workdir resumes exactly and refuses a rerun with other adapters."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from helpers import ROOT, final_params, run_and_kill, train_cli, tree_hashes
from lima_jax import config, generate, lora, run_files, select, sharding, train
from lima_jax.errors import LimaError
from lima_jax.trained import ROWS, Trained, added_tokens, check_resumable

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


def test_the_first_step_sees_the_base_model_and_only_the_adapters_and_eot_rows_train(tmp_path):
  """B starts at zero, so the LoRA model's logits are the base model's bit for bit; training
  moves the adapters and the new EOT's embedding and LM-head rows (the toy's tokenizer has no
  EOT: it is row 1000, added by the run) and leaves every other base param and row, the
  padding rows 1001-1023 included, bit-identical. The reference moves: the same check with
  nonzero B fails, and the adapters and EOT rows do change."""
  setup = train.prepare(cli_config(), str(tmp_path / "lora"))
  base_setup = train.prepare(cli_config(rank=0), str(tmp_path / "full"))
  trainer = setup.trainer
  eot = setup.tokenizer.eot_id
  assert setup.tokenizer.adds_eot and trainer.trained.token_rows == (eot,) == (1000,)
  state = trainer.init(0)
  base_params = base_setup.trainer.init(0)["params"]
  # The seed gives the same base with or without adapters.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen(state["params"])),
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

  # The optimizer state covers the adapters and the two EOT rows alone.
  d = trainer.model_cfg.d_model
  assert trainer.num_trainable == sum(
      x.size for x in jax.tree.leaves(lora.adapters(state["params"]))) + 2 * d
  opt_leaves = jax.tree.leaves(state["opt_state"])
  assert sum(x.size for x in opt_leaves) < 3 * trainer.num_trainable + 10
  before = jax.device_get(state["params"])
  for step in range(3):
    state, metrics = trainer.train_step(state, batch_of(setup, step))
    assert np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state["params"])
  tables = {"embed": lambda x: np.delete(x, eot, axis=0),
            "lm_head": lambda x: np.delete(x, eot, axis=1)}
  for name, others in tables.items():  # every row but EOT's, padding included
    np.testing.assert_array_equal(others(after[name]), others(before[name]))
    assert not np.array_equal(after[name], before[name])
  np.testing.assert_array_equal(after["embed"][1001:], 0)
  rest = {k: v for k, v in lora.frozen(after).items() if k not in tables}
  jax.tree.map(np.testing.assert_array_equal, rest,
               {k: v for k, v in lora.frozen(before).items() if k not in tables})
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora.adapters(after)),
                                                    jax.tree.leaves(lora.adapters(before)))]
  assert all(moved)


def test_token_rows_train_for_every_added_id_and_only_with_lora():
  """The mechanism takes any number of added ids (a run adds one today, its EOT): a part holds
  those rows of the embedding [rows, d] and the LM head [d, rows], and joining a part back
  sets them and nothing else. Full fine-tuning trains every row, so rows are refused there;
  an existing token named as EOT adds no row."""
  rng = np.random.default_rng(0)
  tree = {"embed": rng.normal(size=(8, 3)).astype(np.float32),
          "lm_head": rng.normal(size=(3, 8)).astype(np.float32),
          "blocks": {"attn": {"wq": np.zeros(2), "lora_q": {"lora": {"lora_a": np.ones(2)}}}}}
  trained = Trained(lora=True, token_rows=(5, 2))
  part = trained.part(tree)
  np.testing.assert_array_equal(part[ROWS]["embed"], tree["embed"][[5, 2]])
  np.testing.assert_array_equal(part[ROWS]["lm_head"], tree["lm_head"][:, [5, 2]])
  assert set(part["blocks"]["attn"]) == {"lora_q"}
  part[ROWS] = {"embed": part[ROWS]["embed"] + 1, "lm_head": part[ROWS]["lm_head"] + 1}
  joined = trained.join(trained.rest(tree), part)
  np.testing.assert_array_equal(joined["embed"][[5, 2]], part[ROWS]["embed"])
  np.testing.assert_array_equal(joined["lm_head"][:, [5, 2]], part[ROWS]["lm_head"])
  others = [0, 1, 3, 4, 6, 7]
  np.testing.assert_array_equal(joined["embed"][others], tree["embed"][others])
  np.testing.assert_array_equal(joined["lm_head"][:, others], tree["lm_head"][:, others])
  with pytest.raises(ValueError):
    Trained(lora=False, token_rows=(5,))
  assert added_tokens({"eot_id": 7, "eot_token": "<|eot|>"}) == (7,)
  assert added_tokens({"eot_id": 2, "eot_token": "</s>"}) == ()


def test_a_lora_workdir_holds_adapters_alone_and_generates_with_them(reference, tmp_path):
  workdir, adapters = reference
  # Checkpoints and the selection export hold the adapters and the EOT rows, never the base.
  assert set(adapters) == {"blocks", ROWS} and set(adapters[ROWS]) == {"embed", "lm_head"}
  assert adapters[ROWS]["embed"].shape == (1, 64)
  kept = run_files.locate(workdir, epoch=2)
  source, tokenizer = generate.open_kept(kept)
  trainer, params = generate.restore_kept(kept, source)
  assert trainer.uses_lora and trainer.trained.token_rows == (tokenizer.eot_id,)
  # The base comes back from the run's seed, the adapters and EOT rows from the export.
  base = jax.device_get(trainer.init(0)["params"])
  joined = jax.device_get(trainer.joined(trainer.frozen(base), adapters))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), joined)
  assert not np.array_equal(joined["embed"], base["embed"])
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


def test_a_workdir_trained_with_other_token_rows_is_refused(reference):
  """A LoRA workdir whose checkpoints recorded other trained rows (a run with a new EOT from
  before the rows trained recorded none) is refused in one line; its own record resumes."""
  workdir, _ = reference
  saved = run_files.locate(workdir, epoch=2).meta
  assert saved[ROWS] == [1000]
  check_resumable(saved, saved, workdir)
  with pytest.raises(LimaError, match=r"train the embedding rows of tokens \[\], this run "
                                      r"would train those of \[1000\]"):
    check_resumable({k: v for k, v in saved.items() if k != ROWS}, saved, workdir)


def test_bad_lora_settings_name_their_key():
  for key, value, words in (("rank", -1, "lora.rank"), ("alpha", 0.0, "lora.alpha"),
                            ("dropout", 1.0, "lora.dropout"), ("targets", "q,w", "lora.targets")):
    cfg = cli_config(**{key: value})
    with pytest.raises(LimaError, match=words):
      config.validate(cfg)


def short_conversations(name: str, out, words: int = 10) -> str:
  """The sample file `name` with every turn cut to its first `words` words: each conversation
  fits 64 tokens whole, so every answer ends with its EOT target."""
  with open(config.sample_data(name), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  with open(out, "w", encoding="utf-8") as f:
    for record in records:
      turns = [" ".join(t.split()[:words]) for t in record["conversations"]]
      f.write(json.dumps(dict(record, conversations=turns[:len(turns) // 2 * 2])) + "\n")
  return str(out)


def eot_probabilities(workdir: str, cfg, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """(p(EOT), whether EOT is the arg max) at every EOT target of the run's training
  conversations, from epoch `epoch`'s kept params (base and trained part joined)."""
  setup = train.prepare(cfg, workdir)
  kept = run_files.locate(workdir, epoch=epoch)
  source, tokenizer = generate.open_kept(kept)
  trainer, params = generate.restore_kept(kept, source)
  forward = jax.jit(lambda p, b: trainer.model(p)(b["tokens"], b["positions"], b["segment_ids"]))
  probs = []
  for step in range(setup.plan.steps_per_epoch):  # every example once
    batch = setup.layout.pack([setup.examples[i] for i in setup.plan.example_ids(step)])
    batch = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    at_eot = (batch["targets"] == tokenizer.eot_id) & (batch["weights"] > 0)
    probs.append(jax.nn.softmax(np.asarray(forward(params, batch))[at_eot], axis=-1))
  probs = np.concatenate(probs)
  return probs[:, tokenizer.eot_id], probs.argmax(-1) == tokenizer.eot_id


def test_a_lora_run_with_a_new_eot_on_a_pretrained_toy_learns_to_end_its_answers(tmp_path):
  """A pretrained base whose vocabulary has no EOT of LIMA's (a tiny model fully trained on the
  sample train set with the tokenizer's `</s>` as EOT, exported as an HF directory), then LoRA
  (rank 8, every projection) on the dev conversations it has not seen, in the lima format with
  a new EOT row (the mean of the others). Its train loss halves, and since the EOT rows train,
  the model learns to end its answers: before, p(EOT) <= 1/V at every EOT target and greedy
  answers run to max_tokens; after, p(EOT) is the arg max at the end of the answers and the
  answers stop. With the EOT rows frozen (as before they trained) p(EOT) stayed below 1/V."""
  base_cfg = cli_config(rank=0)
  base_cfg.data.train_path = short_conversations("train.jsonl", tmp_path / "train.jsonl")
  base_cfg.data.eot_token = "</s>"
  base_cfg.train.epochs, base_cfg.eval.generate_epochs = 20, (20,)
  base_cfg.checkpoint.every_steps = 0
  train.run(base_cfg, str(tmp_path / "base"))
  select.choose(str(tmp_path / "base"), 20, str(tmp_path / "base_hf"), "hf")

  cfg = cli_config(rank=8, dropout=0.0)
  cfg.init_from = str(tmp_path / "base_hf")
  cfg.data.tokenizer_path, cfg.data.eot_token = "", ""  # init_from's, and a new EOT
  cfg.data.train_path = short_conversations("dev.jsonl", tmp_path / "dev.jsonl")
  cfg.train.epochs, cfg.eval.generate_epochs = 30, (0, 30)
  cfg.checkpoint.every_steps = 0
  workdir = str(tmp_path / "lora")
  train.run(cfg, workdir)
  steps, epochs = run_files.read_metrics(workdir)
  assert epochs[-1]["loss"] < steps[0]["loss"] / 2, (steps[0]["loss"], epochs[-1]["loss"])

  vocab = generate.open_kept(run_files.locate(workdir, epoch=0))[1].vocab_size
  before, best_before = eot_probabilities(workdir, cfg, 0)
  after, best_after = eot_probabilities(workdir, cfg, 30)
  assert len(after) == 14 and before.max() <= 1 / vocab and not best_before.any(), before
  assert np.median(after) > 100 / vocab and best_after.mean() >= 0.9, (after, best_after)

  def stops(epoch: int) -> tuple[int, int]:
    """(greedy answers ending at the new EOT, answers ending at any stop id: the new EOT or the
    base's own `</s>`, which every generation path stops at too)."""
    out = tmp_path / f"answers_{epoch}.jsonl"
    generate.main(["--workdir", workdir, "--epoch", str(epoch), "--prompts",
                   cfg.data.train_path, "--out", str(out), "--greedy", "--max_tokens", "40"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return (sum(r.get("stop_token") == "<|eot|>" for r in records),
            sum(r["stopped"] != "length" for r in records))

  assert stops(0)[0] == 0
  at_eot, at_any = stops(30)
  assert at_eot >= 10 and at_any >= 12, (at_eot, at_any)


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
