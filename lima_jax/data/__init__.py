"""The data side of training: JSONL -> TFDS -> chat tokens -> epoch plan -> packed steps."""

from lima_jax.data.batching import EpochPlan
from lima_jax.data.chat_format import EOT_TEXT, FORMATS, ChatTokenizer, Example, load_tokenizer
from lima_jax.data.conversations import Conversation
from lima_jax.data.lima_dataset import prepared_dir, read_conversations
from lima_jax.data.packing import StepLayout, pack_step, rows_needed
from lima_jax.data.pipeline import load_examples

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
