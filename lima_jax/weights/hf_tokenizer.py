"""The tokenizer of a Hugging Face export, written so that transformers reproduces training.

`AutoTokenizer.from_pretrained(export).apply_chat_template(messages)` renders the chat template
written here and tokenizes the text with special tokens matched; the ids equal those training
used, for every backend and chat format (tests/test_tokenizers.py checks every sample
conversation). What that takes, measured with transformers 5.24:

- sentencepiece: tokenizer.model with `legacy: true` (each stretch of text between special
  tokens gets sentencepiece's dummy prefix, as each utterance did in training; transformers 5's
  default `legacy: false` prefixes only the start of the text, so every later turn differed).
- tokenizer.json: the file itself, loaded verbatim (tokenizer_class PreTrainedTokenizerFast: a
  model-specific class would rebuild it); for the lima format a Metaspace `prepend_scheme:
  first` becomes `always`, for the same reason as above.
- tiktoken: converted to a tokenizer.json by transformers' own TikTokenConverter with LLaMA-3's
  pattern and special tokens (needs transformers: `pip install 'lima_jax[convert]'`).

A new EOT row is named `<|eot|>` (an added special token at its id; ids between the
tokenizer's tokens and EOT, rows the weights had beyond the tokenizer, get placeholder names).
The lima format's template is BOS (if any) then each message followed by EOT; the template
format keeps the tokenizer's own template and special tokens.
"""

import json
import os

from lima_jax.data import ChatTokenizer
from lima_jax.data import tokenizer as backends
from lima_jax.data import tokenizer_files
from lima_jax.errors import LimaError

_DROPPED_CONFIG_KEYS = ("tokenizer_class", "chat_template", "auto_map", "tokenizer_file",
                        "vocab_file", "legacy", "add_prefix_space")


def _added(content: str) -> dict:
  return {"content": content, "special": True, "lstrip": False, "rstrip": False,
          "normalized": False, "single_word": False}


def _new_tokens(tok: ChatTokenizer) -> dict[int, str]:
  """{id: name} of the ids the model has and the tokenizer does not name, up to EOT."""
  if not tok.adds_eot and tok.eot_id < tok.token_count:
    return {}
  names = {i: f"<|lima_jax_row_{i}|>" for i in range(tok.token_count, tok.eot_id)}
  names[tok.eot_id] = tok.eot_text
  return names


def lima_template(tok: ChatTokenizer) -> str:
  """The lima format as a chat template: BOS, then each message's content followed by EOT, then
  EOS (BOS and EOS if the tokenizer adds them; no EOS after a generation prompt)."""
  bos = "" if tok.bos_id is None else "{{ " + json.dumps(tok.token_text(tok.bos_id)) + " }}"
  eos = "" if tok.eos_append_id is None else (
      "{% if not add_generation_prompt %}{{ " + json.dumps(tok.token_text(tok.eos_append_id))
      + " }}{% endif %}")
  return (bos + "{% for message in messages %}{{ message['content'] }}{{ "
          + json.dumps(tok.eot_text) + " }}{% endfor %}" + eos)


def write(out_dir: str, tok: ChatTokenizer) -> None:
  """tokenizer files, tokenizer_config.json (with the chat template) and
  special_tokens_map.json in out_dir."""
  config = {k: v for k, v in tok.files.json(tokenizer_files.CONFIG).items()
            if k not in _DROPPED_CONFIG_KEYS}
  config.update(tok.special_variables())
  new = _new_tokens(tok)
  if tok.kind == "sentencepiece":
    tok.write_files(out_dir, [tokenizer_files.MODEL])
    added = dict(config.get("added_tokens_decoder", {}))
    added.update({str(i): _added(name) for i, name in new.items()})
    config.update(tokenizer_class="LlamaTokenizer", legacy=True, add_prefix_space=True,
                  add_bos_token=tok.bos_id is not None,
                  add_eos_token=tok.eos_append_id is not None,
                  added_tokens_decoder=added)
  else:
    _write_tokenizer_json(out_dir, tok, new)
    config.pop("added_tokens_decoder", None)  # tokenizer.json holds them
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
  if tok.chat_format == "lima":
    config["chat_template"] = lima_template(tok)
    config["eos_token"] = tok.eot_text  # what a plain generate() stops on
    config.setdefault("pad_token", tok.eot_text)
  else:
    config["chat_template"] = tok.template.source
  config.setdefault("model_max_length", 1 << 30)
  special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
             if k in config}
  _write_json(os.path.join(out_dir, tokenizer_files.CONFIG), config)
  _write_json(os.path.join(out_dir, tokenizer_files.SPECIAL_MAP), special)


def _write_tokenizer_json(out_dir: str, tok: ChatTokenizer, new: dict[int, str]) -> None:
  from tokenizers import AddedToken, Tokenizer  # pylint: disable=import-outside-toplevel
  if tok.kind == "tiktoken":
    tokenizer = _from_tiktoken(tok)
  else:
    tokenizer = Tokenizer.from_str(tok.backend.tokenizer.to_str())  # a copy
  for token, name in sorted(new.items()):
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    if tokenizer.token_to_id(name) != token:  # `tokenizers` appends; ids must follow on
      raise LimaError(f"{tok.path}: cannot name id {token} {name!r} in the exported tokenizer")
  spec = json.loads(tokenizer.to_str())
  if tok.chat_format == "lima":
    _prefix_every_segment(spec.get("pre_tokenizer"))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, tokenizer_files.JSON), "w", encoding="utf-8") as f:
    json.dump(spec, f, ensure_ascii=False)


def _prefix_every_segment(node) -> None:
  """Metaspace `prepend_scheme: first` -> `always`, anywhere in a pre-tokenizer spec: the lima
  format encodes each utterance on its own, so each gets the prefix."""
  if isinstance(node, dict):
    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
      node["prepend_scheme"] = "always"
    for value in node.values():
      _prefix_every_segment(value)
  elif isinstance(node, list):
    for value in node:
      _prefix_every_segment(value)


def _from_tiktoken(tok: ChatTokenizer):
  try:
    # pylint: disable-next=import-outside-toplevel
    from transformers.convert_slow_tokenizer import TikTokenConverter
  except ImportError:
    raise LimaError("exporting a tiktoken tokenizer needs transformers: "
                    "pip install 'lima_jax[convert]'") from None
  class FromRanks(TikTokenConverter):
    """The converter on the ranks already read (it would read the file again)."""

    def load_tiktoken_bpe(self, tiktoken_url):  # pylint: disable=arguments-differ,unused-argument
      return tok.backend.ranks

  return FromRanks(pattern=backends.LLAMA3_PATTERN,
                   extra_special_tokens=backends.LLAMA3_SPECIALS).converted()


def _write_json(path: str, obj: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")
