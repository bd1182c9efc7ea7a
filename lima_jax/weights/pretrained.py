"""Our params-only Orbax directory, and the weights a training run starts from (`init_from`).

An imported model is laid out like a run's checkpoints directory, so one reader serves both:

  OUT_DIR/0/state        Orbax: {'params': ...}
  OUT_DIR/0/meta         JSON: format, model fields, tokenizer sha256, what an HF export needs
  OUT_DIR/tokenizer.model
"""

import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from lima_jax.checkpoint import META, STATE, Checkpoints
from lima_jax.data import ChatTokenizer
from lima_jax.errors import LimaError
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer
from lima_jax.weights import hf, layout, meta

FORMAT = "lima_jax.pretrained"
TOKENIZER = "tokenizer.model"


def abstract_params(model_cfg: LlamaConfig, mesh):
  """Sharded ShapeDtypeStructs of the params, exactly as training lays them out."""
  trainer = Trainer(model_cfg, optax.identity(), optax.constant_schedule(0.0), mesh, 0)
  return trainer.abstract_state["params"]


def tokenizer_info(path: str) -> tuple[int, str]:
  """(piece count, sha256) of a sentencepiece model file."""
  try:
    tokenizer = ChatTokenizer(path)
  except LimaError:
    raise LimaError(f"{path}: not a readable sentencepiece tokenizer") from None
  return tokenizer.piece_count, tokenizer.sha256


def vocab_plan(source_vocab: int, piece_count: int, where: str) -> tuple[int, bool]:
  """(our vocab_size, whether to add the EOT row): a source either lacks EOT (LLaMA as
  released) or already has it as its last row (our own export)."""
  if source_vocab == piece_count:
    return piece_count + 1, True
  if source_vocab == piece_count + 1:
    return source_vocab, False
  raise LimaError(f"{where}: the weights have a vocabulary of {source_vocab}, but the tokenizer "
                  f"has {piece_count} pieces (expected {piece_count}, or {piece_count + 1} "
                  "with EOT)")


def _has_steps(path: str) -> bool:
  return os.path.isdir(path) and any(
      n.isdigit() and os.path.isdir(os.path.join(path, n, "meta")) for n in os.listdir(path))


class OrbaxParams:
  """The params of one step of our checkpoints: an imported model, or a run's workdir (or its
  checkpoints directory)."""

  def __init__(self, path: str, step: int | None = None):
    self.path = path
    path = os.path.abspath(path)  # Orbax wants absolute paths
    ckpt_dir = path if _has_steps(path) else os.path.join(path, "checkpoints")
    if not _has_steps(ckpt_dir):
      raise LimaError(f"{path}: not a lima_jax checkpoint directory (no <step>/meta inside); "
                      "Hugging Face directories hold config.json, Meta ones params.json")
    ckpts = Checkpoints(ckpt_dir, async_save=False)
    try:
      steps = ckpts.all_steps()
      if step is None:
        step = max(steps)
      elif step not in steps:
        raise LimaError(f"{path}: no checkpoint of step {step} (have {sorted(steps)})")
      saved = ckpts.read_meta(step)
    finally:
      ckpts.close()
    self.fields = layout.model_fields(saved.get("model"))
    if self.fields is None:
      raise LimaError(f"{path}: step {step} has no lima_jax model metadata")
    self.step = step
    self.extras = saved.get("hf", {})
    self.tokenizer_sha256 = saved.get("tokenizer_sha256")
    if saved.get("format") == FORMAT:
      self._tokenizer = os.path.join(path, TOKENIZER)
    else:
      self._tokenizer = saved.get("config", {}).get("data", {}).get("tokenizer_path")
    self._state_dir = os.path.join(ckpt_dir, str(step), "state")
    self._shapes = None

  def tokenizer(self) -> str | None:
    """The tokenizer file the params belong to, checked against the recorded hash."""
    if not self._tokenizer or not os.path.isfile(self._tokenizer):
      return None
    if self.tokenizer_sha256 and tokenizer_info(self._tokenizer)[1] != self.tokenizer_sha256:
      raise LimaError(f"{self._tokenizer}: differs from the tokenizer {self.path} was saved with")
    return self._tokenizer

  def restore(self, abstract):
    """The params alone (a run's checkpoint also holds optimizer state), onto `abstract`."""
    item = {"params": abstract}
    restored = ocp.PyTreeCheckpointer().restore(self._state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    return restored["params"]

  def host(self, name: str) -> np.ndarray:
    """One param (dotted name) as a host array, restored alone to bound host memory."""
    if self._shapes is None:
      self._shapes = ocp.PyTreeCheckpointer().metadata(self._state_dir).item_metadata.tree
    tree = self._shapes["params"]
    keys = name.split(".")
    for key in keys:
      tree = tree[key]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.ShapeDtypeStruct(tuple(tree.shape), tree.dtype, sharding=device)
    for key in reversed(keys):
      target = {key: target}
    restored = self.restore(target)
    for key in keys:
      restored = restored[key]
    return np.asarray(restored)


def open_source(path: str):
  """An HF, Meta or lima_jax directory, recognised by its files."""
  if not os.path.isdir(path):
    raise LimaError(f"{path}: no such directory")
  if os.path.isfile(os.path.join(path, hf.CONFIG)):
    return hf.HfSource(path)
  if os.path.isfile(os.path.join(path, meta.PARAMS)):
    return meta.MetaSource(path)
  return OrbaxParams(path)


def source_info(path: str, *, config_only: bool = False) -> tuple[dict, dict, bool]:
  """(model fields, HF extras, whether the rows hold EOT) of an HF, Meta or lima_jax directory,
  reading no weights. fields['vocab_size'] is the source's embedding rows, which already hold
  LIMA's EOT in our own checkpoints only. The tensors' shapes are checked against the config,
  unless config_only, where an HF directory's config.json alone is enough (the planner).
  Raises LimaError naming the file for a source that is not usable."""
  if config_only and os.path.isfile(os.path.join(path, hf.CONFIG)):
    fields, extras = hf.read_config(path)
    return fields, extras, False
  source = open_source(path)
  return source.fields, source.extras, isinstance(source, OrbaxParams)


def save(out_dir: str, params, fields: dict, *, tokenizer_path: str, extras: dict,
         source: str) -> None:
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise LimaError(f"{out_dir}: exists and is not empty; choose a new output directory")
  saved = {"format": FORMAT, "model": fields, "tokenizer_sha256": tokenizer_info(tokenizer_path)[1],
           "hf": extras, "source": source}
  # The layout of `Checkpoints`, written with bounded in-flight bytes: the default handler stages
  # gigabytes at once, which on a CPU host comes on top of the params themselves.
  manager = ocp.CheckpointManager(
      os.path.abspath(out_dir),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(save_concurrent_gb=1,
                                                        save_device_host_concurrent_gb=1),
                     META: ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True))
  try:
    manager.save(0, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave({"params": params}),
                                               META: ocp.args.JsonSave(saved)}))
  finally:
    manager.close()
  shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER))


def check_model(fields: dict, model_cfg: LlamaConfig, path: str) -> None:
  """The model must be the imported one exactly (`train.model_config` takes it from there)."""
  for key in layout.MODEL_KEYS:
    want, have = getattr(model_cfg, key), fields[key]
    if want == have:
      continue
    if key == "vocab_size":
      raise LimaError(f"data.tokenizer_path: gives a vocabulary of {want} (with EOT), but "
                      f"{path} holds {have}")
    raise LimaError(f"model.{key}: the model has {want!r}, but {path} holds {have!r}")


def load_params(path: str, trainer: Trainer, tokenizer_sha256: str):
  """Params for `trainer` from an HF, Meta or lima_jax directory, placed on its shardings."""
  source = open_source(path)
  model_cfg = trainer.model_cfg
  abstract = trainer.abstract_state["params"]
  if isinstance(source, OrbaxParams):
    fields, add_eot = source.fields, False
    sha = source.tokenizer_sha256
  else:
    vocab, add_eot = vocab_plan(source.fields["vocab_size"], model_cfg.vocab_size - 1,
                                f"data.tokenizer_path: with {path}")
    fields = dict(source.fields, vocab_size=vocab)
    tokenizer = source.tokenizer()
    sha = tokenizer_info(tokenizer)[1] if tokenizer else None
  check_model(fields, model_cfg, path)
  if sha and sha != tokenizer_sha256:
    raise LimaError(f"data.tokenizer_path: differs from the tokenizer of {path}")
  if isinstance(source, OrbaxParams):
    return source.restore(abstract)
  return layout.place(source, abstract, add_eot)


def init_state(trainer: Trainer, path: str, tokenizer_sha256: str) -> dict:
  """A fresh train state whose params come from `path`; the optimizer starts from zero."""
  params = load_params(path, trainer, tokenizer_sha256)
  shardings = trainer.state_shardings
  opt_state = jax.jit(trainer.optimizer.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(np.zeros((), np.int32), shardings["step"])
  return {"step": step, "params": params, "opt_state": opt_state}
