"""The `lima` TFDS builder: a GAIR/lima-format JSONL file prepared as array_record.

Each source file gets its own builder config named after a hash of its bytes, so an edited file
is prepared afresh and an unchanged one reuses what is already under `data_dir`. The data is read
back through `as_data_source()` (random access, no tensorflow); `as_dataset()` would need it.
"""

import contextlib
import hashlib
import io
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from lima_jax.data import conversations
from lima_jax.data.conversations import Conversation

_SPLIT = "train"


class LimaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Prepares one JSONL file; the file is read and validated when the builder is made."""

  name = "lima"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "turns, source and line number of every record"}
  # Nothing is downloaded, so there are no URL checksums to look up beside the code. TFDS
  # 4.9.10's own lookup of a package's code path needs importlib_resources, absent on 3.11.
  code_path = None

  def __init__(self, *, path: str, data_dir: str, what: str | None = None):
    raw = conversations.read_source(path, what)
    # Parsed now, so bad data fails before TFDS writes anything.
    self._lima_records = conversations.parse_conversations(raw, path)
    self.source_sha256 = hashlib.sha256(raw).hexdigest()
    # Set before the base constructor, which asks for the default config.
    self._lima_config = tfds.core.BuilderConfig(
        name=f"sha256-{self.source_sha256[:16]}",
        description=f"conversations from {path}")
    super().__init__(data_dir=data_dir, file_format="array_record")

  def get_default_builder_config(self) -> tfds.core.BuilderConfig:
    return self._lima_config

  def _info(self) -> tfds.core.DatasetInfo:
    # dataset_info_from_configs() only works for builders inside a registered package.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Conversations in the GAIR/lima JSONL format.",
        features=tfds.features.FeaturesDict({
            "turns": tfds.features.Sequence(tfds.features.Text()),
            "source": tfds.features.Text(),
            "line": np.int64,
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the records were read in __init__
    return {_SPLIT: self._generate_examples()}

  def _generate_examples(self):
    for record in self._lima_records:
      yield record.line, {"turns": list(record.turns), "source": record.source,
                          "line": record.line}


def prepared_dir(workdir: str, cache_dir: str = "") -> str:
  """Where the TFDS copies of a run's JSONL files go: `data.cache_dir` if set, else the
  workdir's `tfds/`, or a local cache when the workdir is remote (array_record writes local
  files; a 1,000-record copy takes well under a second to rebuild on each host)."""
  if cache_dir:
    return cache_dir
  if "://" in workdir:
    return os.path.join(os.path.expanduser("~"), ".cache", "lima_jax", "tfds")
  return os.path.join(workdir, "tfds")


def read_conversations(path: str, data_dir: str, *,
                       what: str | None = None) -> list[Conversation]:
  """All records of a JSONL file, in line order, through a TFDS build under `data_dir`.

  `what` names the config key that holds `path`, for the message when the file cannot be read.
  """
  builder = LimaBuilder(path=path, data_dir=data_dir, what=what)
  # TFDS writes into a temporary folder and renames it, so an existing folder is complete.
  # (builder.is_prepared() would log a warning whenever it is not.)
  if builder.data_path.exists():
    logging.info("Reusing the prepared %s for %s", builder.data_dir, path)
  else:
    tfds.disable_progress_bar()
    # TFDS prints its own banner on stdout; keep the console to our log lines.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()
    logging.info("Prepared %s from %s", builder.data_dir, path)
  source = builder.as_data_source(split=_SPLIT)
  records = [_conversation(source[i]) for i in range(len(source))]
  # TFDS shuffles records while writing; the line number restores the file's order.
  records.sort(key=lambda c: c.line)
  return records


def _conversation(record) -> Conversation:
  return Conversation(
      turns=tuple(_text(t) for t in record["turns"]),
      source=_text(record["source"]),
      line=int(record["line"]),
  )


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
