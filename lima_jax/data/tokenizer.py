"""Three tokenizer backends behind one small interface, chosen by what the files hold.

  sentencepiece   tokenizer.model as a sentencepiece proto (LLaMA-1/2, our sample tokenizer)
  tokenizer.json  Hugging Face `tokenizers` (byte-level BPE of LLaMA-3.x and SmolLM2, or the
                  sentencepiece-derived BPE of TinyLlama and Mistral)
  tiktoken        tokenizer.model as tiktoken BPE ranks: Meta's LLaMA-3 release, read with
                  LLaMA-3's split pattern and its 256 special tokens after the ranks, as Meta's
                  reference tokenizer (meta-llama/llama3, llama/tokenizer.py) defines them

Each backend gives: `token_count` (ids it defines, added tokens included), `token_id(text)`,
`token_text(id)`, `encode(text)` (one utterance), `encode_with_offsets(text)` (rendered chat
text, special tokens recognised), `decode(ids)`, and:

  bos_id, eos_append_id   what the tokenizer puts before and after a text it encodes with its
                          special tokens (None: nothing), as transformers does: tokenizer_config
                          .json's add_bos_token / add_eos_token when it has either, else what the
                          tokenizer.json's post-processor adds (sentencepiece without either
                          flag: BOS, as Meta's code and llama.cpp; tiktoken: BOS, as Meta's
                          `encode(bos=True)`)
  named_bos, named_eos    the tokens the files name BOS and EOS (None: none)
  end_ids                 ends the tokenizer itself defines (tiktoken: the ids Meta's LLaMA-3
                          reference stops at)
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
# The specials Meta's reference generation stops at, by index: <|end_of_text|>, <|eom_id|>
# (LLaMA-3.1's name for index 8, reserved and never emitted in 3.0), <|eot_id|>
# (meta-llama/llama-models, models/llama3/tokenizer.py `stop_tokens`).
LLAMA3_STOPS = (1, 8, 9)
# A tiktoken ranks file: "<base64 token> <rank>" per line.
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ [0-9]+\r?$")


def _config_flag(files: TokenizerFiles, key: str) -> bool | None:
  """tokenizer_config.json's add_bos_token / add_eos_token (None when absent)."""
  value = files.json(tokenizer_files.CONFIG).get(key)
  if value is not None and not isinstance(value, bool):
    raise LimaError(f"{files.what}: {files.where(tokenizer_files.CONFIG)}: {key} must be true "
                    f"or false, got {value!r}")
  return value


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
    self.named_bos, self.named_eos, self.unk_id = (
        i if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()))
    add_bos, add_eos = (_config_flag(files, k) for k in ("add_bos_token", "add_eos_token"))
    if add_bos is None and add_eos is None:  # BOS, as Meta's LLaMA code and llama.cpp add it
      add_bos = True
    self.bos_id = self.named_bos if add_bos else None  # as transformers: both flags, else off
    self.eos_append_id = self.named_eos if add_eos else None
    self.end_ids = ()
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
    bos, eos = files.special_token("bos_token"), files.special_token("eos_token")
    self.named_bos = None if bos is None else self.token_id(bos)
    if bos is not None and self.named_bos is None:
      raise LimaError(f"{files.what}: {files.path}: bos_token {bos!r} is not a token")
    self.named_eos = None if eos is None else self.token_id(eos)
    self.end_ids = ()
    add_bos, add_eos = (_config_flag(files, k) for k in ("add_bos_token", "add_eos_token"))
    if add_bos is None and add_eos is None:  # transformers keeps the file's post-processor
      self.bos_id, self.eos_append_id = self._post_processor_adds(files)
    else:  # transformers rebuilds the post-processor from the two flags
      self.bos_id = self.named_bos if add_bos else None
      self.eos_append_id = self.named_eos if add_eos else None

  def _post_processor_adds(self, files) -> tuple[int | None, int | None]:
    """(the id the post-processor puts before a text, the one after), found by encoding a
    text with and without special tokens."""
    plain = self.tokenizer.encode("a", add_special_tokens=False).ids
    full = self.tokenizer.encode("a", add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain),
              len(full)) if plain else len(full)
    before, after = full[:at], full[at + len(plain):]
    if len(before) > 1 or len(after) > 1:
      raise LimaError(f"{files.what}: {files.where(files.main)}: its post-processor adds "
                      f"{before} before and {after} after a text; only one BOS and one EOS "
                      "are supported")
    return (before[0] if before else None), (after[0] if after else None)

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
    self.bos_id = self.named_bos = self.specials["<|begin_of_text|>"]
    self.eos_append_id = None
    self.named_eos = self.specials["<|end_of_text|>"]
    self.end_ids = tuple(len(ranks) + i for i in LLAMA3_STOPS)

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
