"""Our params-only Orbax directory, and the weights a training run starts from (`init_from`).

An imported model is laid out like a run's checkpoints directory, so one reader serves both:

  OUT_DIR/0/state        Orbax: {'params': ...}
  OUT_DIR/0/meta         JSON: format, model fields, the tokenizer's hash and EOT, what an HF
                         export needs
  OUT_DIR/tokenizer.json or tokenizer.model (+ tokenizer_config.json, ...): the tokenizer's files
"""

import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from lima_jax import data, lora
from lima_jax.checkpoint import META, STATE, Checkpoints
from lima_jax.data import ChatTokenizer
from lima_jax.errors import LimaError
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer
from lima_jax.weights import hf, layout, meta

FORMAT = "lima_jax.pretrained"


def abstract_params(model_cfg: LlamaConfig, mesh):
  """Sharded ShapeDtypeStructs of the params, exactly as training lays them out (with LoRA, the
  adapters too)."""
  trainer = Trainer(model_cfg, optax.identity(), optax.constant_schedule(0.0), mesh, 0)
  return trainer.abstract_state["params"]


def vocab_plan(source_rows: int, tokenizer: ChatTokenizer, where: str) -> tuple[int, bool]:
  """(rows of our model, whether EOT is a new row) for weights with `source_rows` embedding rows
  (HF, Meta or ours) and `tokenizer` (from `data.load_tokenizer` with the same source_rows).

  Every id the tokenizer defines must be a row of the weights; rows past its tokens (an HF
  `<pad>` row the tokenizer names, padding) stay what they are. EOT is found by name
  (data.eot_token, a token named `<|eot|>`, or the row our own checkpoints record), never by a
  row count. If none is found EOT is a new row at id max(token count, source rows) =
  source_rows, right after the source's rows; `layout.place` initialises it (embedding and LM
  head) to the mean of the source rows. Raises LimaError naming `where` otherwise.
  """
  if tokenizer.token_count > source_rows:
    raise LimaError(f"{where}: the tokenizer defines {tokenizer.token_count} tokens, but the "
                    f"weights have only {source_rows} embedding rows")
  if tokenizer.adds_eot:
    if tokenizer.eot_id != source_rows:
      raise LimaError(f"{where}: the tokenizer places a new EOT at id {tokenizer.eot_id}, not "
                      f"after the weights' {source_rows} rows")
    return source_rows + 1, True
  if tokenizer.eot_id >= source_rows:
    raise LimaError(f"{where}: EOT {tokenizer.eot_text!r} is id {tokenizer.eot_id}, past the "
                    f"weights' {source_rows} embedding rows")
  return source_rows, False


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
    self.step, self.meta, self.ckpt_dir = step, saved, ckpt_dir
    self.lora_rank = saved.get("model", {}).get("lora_rank", 0)  # >0: adapters alone, no base
    self.extras = saved.get("hf", {})
    self.tokenizer_sha256 = saved.get("tokenizer_sha256")
    data_cfg = saved.get("config", {}).get("data", {})
    # Checkpoints from before tokenizer records: sentencepiece, EOT the last row, lima format.
    self._recorded = saved.get("tokenizer") or {
        "eot_id": self.fields["vocab_size"] - 1, "adds_eot": True, "chat_format": "lima",
        "path": data_cfg.get("tokenizer_path")}
    if saved.get("format") == FORMAT:  # an import keeps its tokenizer beside the weights
      self.tokenizer_path = path
    else:
      self.tokenizer_path = self._recorded.get("path") or data_cfg.get("tokenizer_path")
    self.eot_id = self._recorded["eot_id"]
    # BOS/EOS as the params were trained; an import before that record: as its files say.
    self._trained = "bos_id" in self._recorded or saved.get("format") != FORMAT
    self._ckpt_dir = ckpt_dir
    self._state_dir = os.path.join(ckpt_dir, str(step), "state")
    self._shapes = None

  def tokenizer(self, *, eot_token: str | None = None, chat_format: str | None = None,
                path: str | None = None) -> ChatTokenizer | None:
    """The tokenizer the params belong to (None when its files are gone), checked against the
    recorded hash; its EOT and chat format as recorded unless given."""
    path = path or self.tokenizer_path
    if not path or not epath.Path(path).exists():
      return None
    tokenizer = data.load_tokenizer(
        path, eot_token=eot_token or "", chat_format=chat_format or self._recorded["chat_format"],
        source_rows=self.fields["vocab_size"], source_eot_id=None if eot_token else self.eot_id,
        trained_with=self._recorded if self._trained else None,
        what="init_from" if path == self.tokenizer_path else "data.tokenizer_path")
    if self.tokenizer_sha256 and tokenizer.sha256 != self.tokenizer_sha256:
      raise LimaError(f"{path}: differs from the tokenizer {self.path} was saved with")
    return tokenizer

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
      ckpts = Checkpoints(self._ckpt_dir, async_save=False)
      try:
        self._shapes = ckpts.state_metadata(self.step)
      finally:
        ckpts.close()
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


def run_tokenizer(init_from: str, tokenizer_path: str, *, eot_token: str = "",
                  chat_format: str = "lima", source=None) -> ChatTokenizer:
  """The tokenizer of a training run: data.tokenizer_path, else the one init_from carries, with
  its EOT planned against init_from's embedding rows (`vocab_plan`). `source` is init_from
  already opened by `open_source`, if the caller has it."""
  if not init_from:
    return data.load_tokenizer(tokenizer_path, eot_token=eot_token, chat_format=chat_format)
  source = source or open_source(init_from)
  rows = source.fields["vocab_size"]
  if isinstance(source, OrbaxParams):
    tokenizer = source.tokenizer(eot_token=eot_token, chat_format=chat_format,
                                 path=tokenizer_path or None)
  else:
    path = tokenizer_path or source.tokenizer()
    tokenizer = path and data.load_tokenizer(path, eot_token=eot_token, chat_format=chat_format,
                                             source_rows=rows)
  if not tokenizer:
    raise LimaError(f"data.tokenizer_path: is empty and init_from {init_from} carries no "
                    "tokenizer (tokenizer.json or tokenizer.model); set it")
  vocab_plan(rows, tokenizer, f"init_from: {init_from}")
  return tokenizer


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


def save(out_dir: str, params, fields: dict, *, tokenizer: ChatTokenizer, extras: dict,
         source: str) -> None:
  """Our params-only directory: the params, their metadata and the tokenizer's files."""
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise LimaError(f"{out_dir}: exists and is not empty; choose a new output directory")
  saved = {"format": FORMAT, "model": fields, "tokenizer_sha256": tokenizer.sha256,
           "tokenizer": tokenizer.meta(), "hf": extras, "source": source}
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
  tokenizer.write_files(out_dir)


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


def load_params(path: str, trainer: Trainer, tokenizer: dict):
  """Params for `trainer` from an HF, Meta or lima_jax directory, placed on its shardings (with
  LoRA the base model's, no adapters). `tokenizer` is the run's `ChatTokenizer.meta()`, planned
  by `run_tokenizer` for `path`."""
  source = open_source(path)
  model_cfg = trainer.model_cfg
  abstract = trainer.frozen(trainer.abstract_state["params"])
  add_eot = False
  if isinstance(source, OrbaxParams):
    if source.lora_rank:
      raise LimaError(f"init_from: {path} holds LoRA adapters without their base; export the "
                      "merged model (python -m lima_jax.select --choose=E --format=orbax) and "
                      "start from that")
    fields = source.fields
    if source.tokenizer_sha256 and source.tokenizer_sha256 != tokenizer["sha256"]:
      raise LimaError(f"data.tokenizer_path: differs from the tokenizer of {path}")
  else:
    add_eot = bool(tokenizer["adds_eot"])
    fields = dict(source.fields, vocab_size=source.fields["vocab_size"] + add_eot)
  check_model(fields, model_cfg, path)
  if isinstance(source, OrbaxParams):
    return source.restore(abstract)
  return layout.place(source, abstract, add_eot)


def init_state(trainer: Trainer, path: str, tokenizer: dict) -> dict:
  """A fresh train state whose params come from `path` (with LoRA: the frozen base, and fresh
  adapters); the optimizer starts from zero. `tokenizer`: the run's `ChatTokenizer.meta()`."""
  return trainer.state_from(load_params(path, trainer, tokenizer))


def lora_base(meta: dict, trainer: Trainer) -> dict:
  """The frozen base params of a LoRA run, from its checkpoint metadata (`lora.BASE`): its
  init_from loaded again, or its seed's random init; placed on `trainer`'s mesh. Raises
  LimaError when init_from is gone."""
  record = meta.get(lora.BASE) or {}
  path = record.get("init_from")
  if not path:
    return trainer.frozen(trainer.init(record.get("seed", 0))["params"])
  if not epath.Path(path).exists():
    raise LimaError(f"{path}: the base model this LoRA run was trained on is gone (its "
                    "checkpoints hold the adapters alone); put it back at that path")
  return load_params(path, trainer, meta["tokenizer"])
