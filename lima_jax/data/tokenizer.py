"""Three tokenizer backends behind one small interface, chosen by what the files hold.

  sentencepiece   tokenizer.model as a sentencepiece proto (LLaMA-1/2, our sample tokenizer)
  tokenizer.json  Hugging Face `tokenizers` (byte-level BPE of LLaMA-3.x and SmolLM2, or the
                  sentencepiece-derived BPE of TinyLlama and Mistral)
  tiktoken        tokenizer.model as tiktoken BPE ranks: Meta's LLaMA-3 release, read with
                  LLaMA-3's split pattern and its 256 special tokens after the ranks, as Meta's
                  reference tokenizer (meta-llama/llama3, llama/tokenizer.py) defines them

Each backend gives: `token_count` (ids it defines, added tokens included), `bos_id` (or None),
`token_id(text)`, `token_text(id)`, `encode(text)` (one utterance), `encode_with_offsets(text)`
(rendered chat text, special tokens recognised) and `decode(ids)`.
"""

import hashlib
import os
import re
import tempfile

import numpy as np

from lima_jax.data import tokenizer_files
from lima_jax.data.tokenizer_files import TokenizerFiles, one_line
from lima_jax.errors import LimaError

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
     "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
     "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)])
# A tiktoken ranks file: "<base64 token> <rank>" per line.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ [0-9]+\r?$")


def _added_tokens(files: TokenizerFiles) -> dict[str, int]:
  """{text: id} of tokenizer_config.json's added_tokens_decoder."""
  added = files.json(tokenizer_files.CONFIG).get("added_tokens_decoder", {})
  try:
    return {(v["content"] if isinstance(v, dict) else v): int(k) for k, v in added.items()}
  except (KeyError, TypeError, ValueError):
    raise LimaError(f"{files.what}: {files.where(tokenizer_files.CONFIG)}: unreadable "
                    "added_tokens_decoder") from None


class SentencePiece:
  """A sentencepiece model; tokens of tokenizer_config.json's added_tokens_decoder beyond its
  pieces (an HF `<pad>`, our exports' EOT) count as ids too."""
  kind = "sentencepiece"

  def __init__(self, files: TokenizerFiles):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(files.blobs[files.main])
    except Exception as e:  # sentencepiece reports parse failures as RuntimeError/OSError
      raise LimaError(f"{files.what}: {files.where(files.main)} is not a tokenizer: neither a "
                      f"sentencepiece model nor tiktoken BPE ranks ({one_line(e)})") from None
    self.piece_count = self._sp.get_piece_size()
    self.added = _added_tokens(files)
    self.token_count = max([self.piece_count] + [i + 1 for i in self.added.values()])
    self.bos_id, self.eos_id, self.unk_id = (
        i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()))
    # What transformers matches as special tokens in text: control and unknown pieces, added ones.
    specials = {self._sp.id_to_piece(i) for i in range(self.piece_count)
                if self._sp.is_control(i) or self._sp.is_unknown(i)} | set(self.added)
    self._split = re.compile("(" + "|".join(
        re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")") if specials else None

  def token_text(self, token: int) -> str:
    named = [t for t, i in self.added.items() if i == token]
    return named[0] if named else self._sp.id_to_piece(token)

  def token_id(self, text: str) -> int | None:
    if text in self.added:
      return self.added[text]
    token = self._sp.piece_to_id(text)
    return token if self._sp.id_to_piece(token) == text else None

  def encode(self, text: str) -> list[int]:
    """As today: the text as plain text, with sentencepiece's dummy prefix."""
    return self._sp.encode(text)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Special tokens matched in the text; each piece of text between them encoded on its own
    (the dummy prefix on each, as transformers' legacy LLaMA tokenizer does)."""
    ids, starts, at = [], [], 0
    # re.split with one group: the matched special tokens are the odd parts.
    for i, part in enumerate(self._split.split(text) if self._split else [text]):
      if i % 2:
        ids.append(self.token_id(part))
        starts.append(at)
      elif part:
        # Byte offsets of the pieces -> character offsets into `text`.
        char_of_byte = np.repeat(np.arange(len(part)), [len(c.encode()) for c in part])
        char_of_byte = np.append(char_of_byte, len(part))
        for p in self._sp.encode(part, return_type="proto").pieces:
          ids.append(p.id)
          starts.append(at + int(char_of_byte[min(p.begin, len(char_of_byte) - 1)]))
      at += len(part)
    return ids, starts

  def decode(self, ids) -> str:
    return self._sp.decode([i for i in ids if i < self.piece_count])


class HfJson:
  """A Hugging Face tokenizer.json, through the `tokenizers` library."""
  kind = "tokenizer.json"

  def __init__(self, files: TokenizerFiles):
    import tokenizers  # pylint: disable=import-outside-toplevel
    try:
      self.tokenizer = tokenizers.Tokenizer.from_str(files.blobs[files.main].decode("utf-8"))
    except Exception as e:  # tokenizers raises Exception for a bad file
      raise LimaError(f"{files.what}: {files.where(files.main)} is not a tokenizer.json "
                      f"({one_line(e)[:200]})") from None
    self.token_count = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    bos = files.special_token("bos_token")
    self.bos_id = None if bos is None else self.token_id(bos)
    if bos is not None and self.bos_id is None:
      raise LimaError(f"{files.what}: {files.path}: bos_token {bos!r} is not a token")

  def token_text(self, token: int) -> str:
    return self.tokenizer.id_to_token(token)

  def token_id(self, text: str) -> int | None:
    return self.tokenizer.token_to_id(text)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    encoding = self.tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]

  def decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)


class Tiktoken:
  """Meta's LLaMA-3 tokenizer.model: tiktoken BPE ranks plus LLaMA-3's 256 special tokens."""
  kind = "tiktoken"

  def __init__(self, files: TokenizerFiles):
    import tiktoken  # pylint: disable=import-outside-toplevel
    from tiktoken.load import load_tiktoken_bpe  # pylint: disable=import-outside-toplevel
    blob = files.blobs[files.main]
    source = files.where(files.main)
    local = None
    if "://" in source:  # tiktoken reads local files (remote ones need blobfile)
      with tempfile.NamedTemporaryFile(suffix=".tiktoken", delete=False) as f:
        f.write(blob)
      local = source = f.name
    try:
      # The expected hash keeps tiktoken's cache (keyed by path) from serving an older file.
      ranks = load_tiktoken_bpe(source, expected_hash=hashlib.sha256(blob).hexdigest())
    except ValueError as e:
      raise LimaError(f"{files.what}: {files.where(files.main)}: unreadable tiktoken ranks "
                      f"({one_line(e)[:200]})") from None
    finally:
      if local:
        os.unlink(local)
    self.ranks = ranks
    self.specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    self.encoding = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=self.specials)
    self.token_count = len(ranks) + len(LLAMA3_SPECIALS)
    self.bos_id = self.specials["<|begin_of_text|>"]

  def token_text(self, token: int) -> str:
    return self.encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

  def token_id(self, text: str) -> int | None:
    try:
      return self.encoding.encode_single_token(text)
    except KeyError:
      return None

  def encode(self, text: str) -> list[int]:
    # Special tokens in the text are matched, as transformers does with an exported tokenizer.
    return self.encoding.encode(text, allowed_special="all")

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    ids = self.encode(text)
    return ids, self.encoding.decode_with_offsets(ids)[1]

  def decode(self, ids) -> str:
    return self.encoding.decode(list(ids))


def open_backend(files: TokenizerFiles):
  """The backend for the files: tokenizer.json, else tiktoken ranks or a sentencepiece model."""
  if files.main == tokenizer_files.JSON:
    return HfJson(files)
  first_line = files.blobs[files.main].split(b"\n", 1)[0]
  if _TIKTOKEN_LINE.match(first_line):
    return Tiktoken(files)
  return SentencePiece(files)
