"""The data side of training: JSONL -> TFDS -> chat tokens -> epoch plan -> packed steps."""

import importlib

from lima_jax.data.batching import EpochPlan
from lima_jax.data.chat_format import EOT_TEXT, FORMATS, ChatTokenizer, Example, load_tokenizer
from lima_jax.data.conversations import Conversation
from lima_jax.data.packing import StepLayout, pack_step, rows_needed

# These read through TFDS, so they are imported on first use: packing and epoch plans work
# where tensorflow-datasets is not installed (bench/gpu.py's machine).
_THROUGH_TFDS = {"prepared_dir": "lima_dataset", "read_conversations": "lima_dataset",
                 "load_examples": "pipeline"}


def __getattr__(name):
  if name in _THROUGH_TFDS:
    return getattr(importlib.import_module(f"lima_jax.data.{_THROUGH_TFDS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ChatTokenizer",
    "Conversation",
    "EOT_TEXT",
    "FORMATS",
    "EpochPlan",
    "Example",
    "load_examples",
    "load_tokenizer",
    "pack_step",
    "prepared_dir",
    "read_conversations",
    "rows_needed",
    "StepLayout",
]
