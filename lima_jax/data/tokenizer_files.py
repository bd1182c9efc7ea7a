"""A tokenizer's files: found from a file or a model directory, read whole, hashed as one.

The vocabulary lives in `tokenizer.json` (Hugging Face `tokenizers`) or `tokenizer.model`
(sentencepiece, or Meta's tiktoken BPE ranks for LLaMA-3); a directory holding both is read
through tokenizer.json. The companion files beside it (tokenizer_config.json,
special_tokens_map.json, chat_template.jinja) name BOS and the special tokens and hold the chat
template, so they are part of the tokenizer: copied with it and covered by its hash.
generation_config.json, where the model's directory has one, names the model's end ids
(`eos_token_id`, one id or a list): copied with the tokenizer so that every generation stops at
them, but not hashed (it changes no id, and hashes recorded before it was read stay valid).
"""

import dataclasses
import hashlib
import json

from etils import epath

from lima_jax.errors import LimaError

JSON = "tokenizer.json"
MODEL = "tokenizer.model"
MAIN_FILES = (JSON, MODEL)  # in order of preference within a directory
CONFIG = "tokenizer_config.json"
SPECIAL_MAP = "special_tokens_map.json"
TEMPLATE = "chat_template.jinja"
GENERATION = "generation_config.json"
COMPANIONS = (CONFIG, SPECIAL_MAP, TEMPLATE, GENERATION)
_UNHASHED = (GENERATION,)


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
  """The bytes of every file that defines a tokenizer's ids, under their canonical names."""
  path: str  # as given: a file or a directory
  main: str  # JSON or MODEL
  blobs: dict  # canonical name -> bytes; the main file and the companions present
  what: str  # the config key or flag the path came from, for error messages

  @property
  def sha256(self) -> str:
    """sha256 of the main file alone (what a lone tokenizer.model always hashed to), or of every
    file's name and hash when companions are present."""
    hashed = {k: v for k, v in self.blobs.items() if k not in _UNHASHED}
    if len(hashed) == 1:
      return hashlib.sha256(self.blobs[self.main]).hexdigest()
    lines = "".join(f"{name}\0{hashlib.sha256(blob).hexdigest()}\n"
                    for name, blob in sorted(hashed.items()))
    return hashlib.sha256(lines.encode()).hexdigest()

  def where(self, name: str) -> str:
    """The path a file was read from, for messages."""
    return str(self._dir() / name) if name != self.main or self._is_dir() else self.path

  def json(self, name: str) -> dict:
    """A companion JSON file parsed ({} when absent)."""
    if name not in self.blobs:
      return {}
    try:
      value = json.loads(self.blobs[name])
    except ValueError as e:
      raise LimaError(f"{self.what}: {self.where(name)}: unreadable JSON ({e})") from None
    if not isinstance(value, dict):
      raise LimaError(f"{self.what}: {self.where(name)}: expected a JSON object")
    return value

  def special_token(self, key: str) -> str | None:
    """The text of bos_token / eos_token / ... from tokenizer_config.json, else
    special_tokens_map.json (either spelling: a string or {"content": ...})."""
    for name in (CONFIG, SPECIAL_MAP):
      value = self.json(name).get(key)
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str):
        return value
    return None

  def end_ids(self) -> list[int]:
    """generation_config.json's eos_token_id as a list ([] when absent). Raises LimaError for a
    value that is not an id or a list of ids."""
    value = self.json(GENERATION).get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
      raise LimaError(f"{self.what}: {self.where(GENERATION)}: eos_token_id must be a token id "
                      f"or a list of them, got {value!r}")
    return ids

  def chat_template(self) -> tuple[str, str] | None:
    """(template source, the file it came from): chat_template.jinja wins over the config's
    chat_template (as in transformers); a list of named templates gives its 'default'."""
    if TEMPLATE in self.blobs:
      return self.blobs[TEMPLATE].decode("utf-8"), self.where(TEMPLATE)
    template = self.json(CONFIG).get("chat_template")
    if isinstance(template, list):
      template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return (template, self.where(CONFIG)) if isinstance(template, str) else None

  def write(self, out_dir: str, names=None) -> list[str]:
    """Copies the files (all, or `names`) into out_dir under their canonical names."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, blob in self.blobs.items():
      if names is None or name in names:
        (out / name).write_bytes(blob)
        written.append(str(out / name))
    return written

  def _is_dir(self) -> bool:
    return epath.Path(self.path).is_dir()

  def _dir(self) -> epath.Path:
    path = epath.Path(self.path)
    return path if self._is_dir() else path.parent


def read(path: str, what: str = "data.tokenizer_path") -> TokenizerFiles:
  """The files of the tokenizer at `path`: a tokenizer.json / tokenizer.model file (any name:
  *.json is read as tokenizer.json, anything else as tokenizer.model) or a directory."""
  if not path:
    raise LimaError(f"{what}: is empty; set it to a tokenizer file or a model directory")
  try:
    root = epath.Path(path)
    if root.is_dir():
      main = next((n for n in MAIN_FILES if (root / n).is_file()), None)
      if main is None:
        raise LimaError(f"{what}: {path} holds no {JSON} or {MODEL}")
      folder, main_path = root, root / main
    elif root.is_file():
      main = JSON if root.name.endswith(".json") else MODEL
      folder, main_path = root.parent, root
    else:
      raise LimaError(f"{what}: {path}: no such file or directory")
    blobs = {main: main_path.read_bytes()}
    for name in COMPANIONS:
      if (folder / name).is_file():
        blobs[name] = (folder / name).read_bytes()
  except LimaError:
    raise
  except Exception as e:  # epath raises backend-specific types
    raise LimaError(f"{what}: cannot read {path}: {one_line(e)}") from None
  return TokenizerFiles(path=path, main=main, blobs=blobs, what=what)


def one_line(error: Exception) -> str:
  return " ".join(str(error).split()) or type(error).__name__
