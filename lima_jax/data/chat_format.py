"""Chat formatting on a sentencepiece tokenizer: every utterance is followed by an EOT token.

EOT is not a piece of the tokenizer: it takes the first id after the tokenizer's vocabulary
(32,000 for LLaMA), the same rule for any model file, so LLaMA's own tokenizer is used unchanged.
"""

import dataclasses
import hashlib

from etils import epath
import numpy as np
import sentencepiece as spm

from lima_jax.errors import LimaError

_KEY = "data.tokenizer_path"


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized conversation: ids int32 and a float32 loss mask of the same length."""
  ids: np.ndarray
  loss_mask: np.ndarray


class ChatTokenizer:
  """A sentencepiece model plus the EOT id appended after its vocabulary."""

  def __init__(self, path: str):
    try:
      blob = epath.Path(path).read_bytes()
    except Exception as e:  # epath raises backend-specific types
      raise LimaError(f"{_KEY}: cannot read {path}: {_one_line(e)}") from None
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(blob)
    except Exception as e:  # sentencepiece reports parse failures as RuntimeError/OSError
      raise LimaError(f"{_KEY}: {path} is not a sentencepiece model: {_one_line(e)}") from None
    self.path = path
    self.sha256 = hashlib.sha256(blob).hexdigest()
    self.piece_count = self._sp.get_piece_size()
    self.eot_id = self.piece_count
    self.vocab_size = self.piece_count + 1
    self.bos_id = self._sp.bos_id()
    if self.bos_id < 0:
      raise LimaError(f"{_KEY}: {path} defines no BOS piece")

  def encode_conversation(self, turns, max_length: int,
                          train_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """ids = [BOS] + (turn + [EOT]) for each turn, trimmed to the first max_length tokens.

    The mask is 1 on assistant turns (odd positions in `turns`) and their EOT; with
    train_on_prompt it is 1 on every token but BOS.
    """
    if max_length < 1:
      raise ValueError(f"max_length must be positive, got {max_length}")
    pieces = self._sp.encode(list(turns)) if turns else []
    # Per-turn segments: the turn's pieces followed by EOT.
    lengths = np.array([len(p) + 1 for p in pieces], np.int64)
    weights = np.array([1.0 if train_on_prompt or i % 2 else 0.0
                        for i in range(len(pieces))], np.float32)
    ids = np.empty(1 + int(lengths.sum()), np.int32)
    ids[0] = self.bos_id
    ends = 1 + np.cumsum(lengths)
    start = 1
    for p, end in zip(pieces, ends):
      ids[start:end - 1] = p
      ids[end - 1] = self.eot_id
      start = end
    mask = np.concatenate([np.zeros(1, np.float32), np.repeat(weights, lengths)])
    return ids[:max_length], mask[:max_length]

  def encode_prompt(self, turns) -> np.ndarray:
    """[BOS] + each turn followed by EOT; pass turns ending with a user turn for generation."""
    ids, _ = self.encode_conversation(turns, max_length=np.iinfo(np.int32).max,
                                      train_on_prompt=False)
    return ids

  def decode(self, ids) -> str:
    """Text of the tokenizer's own pieces; EOT and padded ids past the vocabulary are dropped."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    kept = ids[(ids >= 0) & (ids < self.piece_count)]
    return self._sp.decode(kept.tolist())


def _one_line(error: Exception) -> str:
  return " ".join(str(error).split()) or type(error).__name__
