"""Conversations as token ids and a loss mask, in one of two chat formats, on any tokenizer.

  lima      (default; the paper's format) the tokenizer's BOS, then every utterance followed by
            EOT, each utterance encoded on its own, then the tokenizer's EOS. BOS and EOS are what
            the tokenizer adds to a text it encodes (add_bos_token / add_eos_token, as
            transformers and llama.cpp honour them): SmolLM2's adds neither, LLaMA's only BOS.
            A prompt is a conversation's beginning: no EOS.
  template  the tokenizer's own chat template (tokenizer_config.json's chat_template or
            chat_template.jinja), for a model that speaks its family's standard format.

EOT (end of turn), by LIMA's rule, is a new token after the vocabulary: id max(the tokenizer's
token count, the weights' embedding rows), its embedding and LM-head rows initialised to the
mean of the others. `data.eot_token` names an existing special token to use instead
(`<|eot_id|>` for LLaMA-3, `<|im_end|>` for SmolLM2): no new row. A tokenizer that already
names our EOT (`<|eot|>`, as our exports do) keeps it. EOT is found by name, never by counting
rows: a padding row (an HF `<pad>`) stays padding.

Stop ids (`ChatTokenizer.stop_ids`): EOT, then the model's own end ids, which every generation
path stops at too: the tokenizer's eos_token, generation_config.json's eos_token_id (LLaMA-3.x
lists <|end_of_text|>, <|eom_id|>, <|eot_id|>; a GGUF import writes its eos, eot and eom ids
there) and, for Meta's LLaMA-3 tiktoken files, the specials Meta's generation stops at.

Loss mask: the assistant utterances and their EOT (the template format: what each assistant
message adds to the text, up to and including its EOT token); with train_on_prompt every token
but the first.
"""

import dataclasses

import numpy as np

from lima_jax.data import tokenizer_files
from lima_jax.data.chat_template import ChatTemplate
from lima_jax.data.tokenizer import open_backend
from lima_jax.errors import LimaError

FORMATS = ("lima", "template")
EOT_TEXT = "<|eot|>"  # the name of LIMA's new EOT token in our exports
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized conversation: ids int32 and a float32 loss mask of the same length."""
  ids: np.ndarray
  loss_mask: np.ndarray


def _messages(turns) -> list[dict]:
  return [{"role": "assistant" if i % 2 else "user", "content": t} for i, t in enumerate(turns)]


class ChatTokenizer:
  """A tokenizer backend, its EOT and a chat format. Build one with `load_tokenizer`.

  Attributes: path, sha256 (of every file that defines the ids), kind (the backend),
  token_count (ids the tokenizer defines), vocab_size (rows the model needs, EOT included),
  eot_id, eot_text, adds_eot (EOT is a new row), bos_id (or None: nothing is prepended),
  eos_append_id (or None: nothing is appended to a whole conversation in the lima format),
  end_ids (the model's own end ids besides EOT), chat_format, template (a ChatTemplate, for the
  template format).
  """

  def __init__(self, files, backend, *, eot_id: int, eot_text: str, adds_eot: bool,
               vocab_size: int, chat_format: str, template: ChatTemplate | None,
               framing: tuple[int | None, int | None]):
    self.files, self.backend = files, backend
    self.path, self.sha256, self.kind = files.path, files.sha256, backend.kind
    self.token_count = backend.token_count
    self.bos_id, self.eos_append_id = framing
    ends = [backend.named_eos] + files.end_ids() + list(backend.end_ids)
    for token in ends:
      if token is not None and token >= self.token_count:
        raise LimaError(f"{files.what}: {files.path}: end id {token} (eos_token_id) is not one "
                        f"of the tokenizer's {self.token_count} ids")
    self.end_ids = tuple(dict.fromkeys(t for t in ends if t is not None and t != eot_id))
    self.eot_id, self.eot_text, self.adds_eot = eot_id, eot_text, adds_eot
    self.vocab_size, self.chat_format, self.template = vocab_size, chat_format, template

  def encode_conversation(self, turns, max_length: int,
                          train_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, loss mask float32), trimmed to the first max_length tokens. Turns alternate
    user, assistant, ... starting with the user."""
    if max_length < 1:
      raise ValueError(f"max_length must be positive, got {max_length}")
    if self.chat_format == "template":
      ids, mask = self._encode_template(turns, train_on_prompt)
    else:
      ids, mask = self._encode_lima(turns, train_on_prompt)
    return ids[:max_length], mask[:max_length]

  def _encode_lima(self, turns, train_on_prompt, whole=True):
    """ids = [BOS] + (turn + [EOT]) for each turn + [EOS] (BOS, EOS if the tokenizer adds
    them; EOS only to a whole conversation, not to a prompt); the mask covers assistant turns
    (odd positions in `turns`) and their EOT, or with train_on_prompt every token but BOS and
    EOS."""
    head = [] if self.bos_id is None else [self.bos_id]
    tail = [] if self.eos_append_id is None or not whole else [self.eos_append_id]
    pieces = [self.backend.encode(t) + [self.eot_id] for t in turns]
    ids = np.array(head + [i for p in pieces for i in p] + tail, np.int32)
    weights = [1.0 if train_on_prompt or i % 2 else 0.0 for i in range(len(pieces))]
    mask = np.concatenate([np.zeros(len(head), np.float32)] +
                          [np.full(len(p), w, np.float32) for p, w in zip(pieces, weights)] +
                          [np.zeros(len(tail), np.float32)])
    if train_on_prompt and not head and len(mask):
      mask[0] = 0.0  # nothing predicts the first token
    return ids, mask

  def _encode_template(self, turns, train_on_prompt):
    text, spans = self.template.render_with_spans(_messages(turns))
    ids, starts = self.backend.encode_with_offsets(text)
    ids, starts = np.asarray(ids, np.int32), np.asarray(starts, np.int64)
    mask = np.zeros(len(ids), np.float32)
    for start, end in spans:
      inside = np.flatnonzero((starts >= start) & (starts < end))
      eots = inside[ids[inside] == self.eot_id]
      if not len(eots):
        raise LimaError(f"data.eot_token: the chat template of {self.template.where} does not "
                        f"end assistant messages with {self.eot_text!r}; set data.eot_token to "
                        "the token it ends them with")
      mask[inside[0]:eots[-1] + 1] = 1.0
    if train_on_prompt:
      mask[1:] = 1.0
    return ids, mask

  def encode_prompt(self, turns) -> np.ndarray:
    """The ids a generation continues: turns ending with a user turn, formatted as in training
    (lima: each turn followed by EOT; template: with the template's generation prompt)."""
    if self.chat_format == "template":
      text = self.template.render(_messages(turns), add_generation_prompt=True)
      return np.asarray(self.backend.encode_with_offsets(text)[0], np.int32)
    return self._encode_lima(turns, False, whole=False)[0]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids every generation path stops at: EOT first, then the model's own end ids."""
    return (self.eot_id,) + self.end_ids

  def decode(self, ids) -> str:
    """Text of the tokenizer's own tokens; BOS, the stop ids and ids past its tokens (padding)
    are dropped."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    dropped = np.isin(ids, list(self.stop_ids) + ([] if self.bos_id is None else [self.bos_id]))
    kept = ids[(ids >= 0) & (ids < self.token_count) & ~dropped]
    return self.backend.decode(kept.tolist())

  def token_text(self, token: int) -> str:
    return self.backend.token_text(token)

  def special_variables(self) -> dict:
    """bos_token, eos_token, ... as the files name them: a chat template's variables."""
    return _special_variables(self.files, self.backend)

  def write_files(self, out_dir: str, names=None) -> list[str]:
    """Copies the tokenizer's files (all, or those in `names`) into out_dir."""
    return self.files.write(out_dir, names)

  def meta(self) -> dict:
    """What a checkpoint records to rebuild this tokenizer (JSON-ready)."""
    return {"path": self.path, "sha256": self.sha256, "kind": self.kind,
            "eot_id": self.eot_id, "eot_token": self.eot_text, "adds_eot": self.adds_eot,
            "chat_format": self.chat_format, "vocab_size": self.vocab_size,
            "bos_id": self.bos_id, "eos_append_id": self.eos_append_id,
            "stop_ids": list(self.stop_ids)}


def _special_variables(files, backend) -> dict:
  names = {key: files.special_token(key) for key in _SPECIAL_KEYS}
  if backend.kind == "sentencepiece":  # transformers' LLaMA tokenizer falls back to the pieces
    sp_ids = {"bos_token": backend.named_bos, "eos_token": backend.named_eos,
              "unk_token": backend.unk_id}
    for key, token in sp_ids.items():
      if names[key] is None and token is not None:
        names[key] = backend.token_text(token)
  return {k: v for k, v in names.items() if v is not None}


def load_tokenizer(path: str, *, eot_token: str = "", chat_format: str = "lima",
                   source_rows: int = 0, source_eot_id: int | None = None,
                   trained_with: dict | None = None,
                   what: str = "data.tokenizer_path") -> ChatTokenizer:
  """The tokenizer at `path` (a tokenizer.json / tokenizer.model file or a model directory),
  its EOT planned for weights with `source_rows` embedding rows (0: a random init).

  EOT: `eot_token` (an existing token's text) if given; else the row `source_eot_id` that our
  own checkpoints record; else a token named `<|eot|>`; else a new row at id
  max(token_count, source_rows). vocab_size = max(token_count, source_rows, eot_id + 1).
  BOS and EOS are the tokenizer's own (`bos_id`, `eos_append_id` of its backend), unless
  `trained_with`, the tokenizer record of a training run's checkpoint (`meta()`), says how its
  params were trained: its recorded ids, or for runs before that record, BOS whenever the files
  name one and no EOS (what lima_jax did then).
  Raises LimaError (one line, naming the file or key) for unreadable files, an unknown
  eot_token, a tokenizer with more ids than the weights have rows, or a template format
  without a template or a named EOT.
  """
  if chat_format not in FORMATS:
    raise LimaError(f"config data.chat_format: must be one of {FORMATS}, got {chat_format!r}")
  files = tokenizer_files.read(path, what)
  backend = open_backend(files)
  count = backend.token_count
  if source_rows and count > source_rows:
    raise LimaError(f"{what}: {path} defines {count} tokens, but the weights have only "
                    f"{source_rows} embedding rows")
  adds = False
  if eot_token:
    eot_id, eot_text = backend.token_id(eot_token), eot_token
    if eot_id is None:
      raise LimaError(f"config data.eot_token: {eot_token!r} is not a token of {path}")
  elif source_eot_id is not None:
    eot_id = source_eot_id
    eot_text = backend.token_text(eot_id) if eot_id < count else EOT_TEXT
  elif backend.token_id(EOT_TEXT) is not None:
    eot_id, eot_text = backend.token_id(EOT_TEXT), EOT_TEXT
  else:
    eot_id, eot_text, adds = max(count, source_rows), EOT_TEXT, True
  template = None
  if chat_format == "template":
    if adds:
      raise LimaError("config data.eot_token: data.chat_format=template needs the template's "
                      "end-of-turn token as EOT (e.g. <|im_end|>, <|eot_id|>); a new EOT token "
                      "never appears in a template")
    found = files.chat_template()
    if found is None:
      raise LimaError(f"config data.chat_format: template, but {path} has no chat template "
                      f"({tokenizer_files.CONFIG} chat_template or {tokenizer_files.TEMPLATE})")
    template = ChatTemplate(found[0], found[1], _special_variables(files, backend))
  framing = backend.bos_id, backend.eos_append_id
  if trained_with is not None:
    framing = ((trained_with["bos_id"], trained_with.get("eos_append_id"))
               if "bos_id" in trained_with else (backend.named_bos, None))
  return ChatTokenizer(files, backend, eot_id=eot_id, eot_text=eot_text, adds_eot=adds,
                       vocab_size=max(count, source_rows, eot_id + 1), chat_format=chat_format,
                       template=template, framing=framing)
