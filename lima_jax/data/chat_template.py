"""A model's own chat template (jinja), rendered as transformers renders it.

transformers renders chat templates in a jinja2 sandbox with trim_blocks and lstrip_blocks, the
loopcontrols extension, a `tojson` filter, `raise_exception` and `strftime_now`, and the special
tokens (bos_token, eos_token, ...) as variables (transformers 5.24,
utils/chat_template_utils.py); the same environment here gives the same text, so that the
exported tokenizer's `apply_chat_template` reproduces the training ids.

The assistant messages are located by rendering growing prefixes of the conversation: the text
of message i is what render(messages[:i + 1]) adds to render(messages[:i],
add_generation_prompt=True).
"""

import datetime
import json

import jinja2
from jinja2 import ext, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lima_jax.errors import LimaError


class _Generation(ext.Extension):
  """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): the body as
  it stands."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


class ChatTemplate:
  """A compiled chat template and the special-token variables it is rendered with."""

  def __init__(self, source: str, where: str, variables: dict):
    self.source, self.where, self.variables = source, where, variables
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self._template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
      raise LimaError(f"data.chat_format: the chat template of {where} does not compile "
                      f"({' '.join(str(e).split())})") from None

  def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.variables)
    except jinja2.exceptions.TemplateError as e:
      raise LimaError(f"data.chat_format: the chat template of {self.where} failed: "
                      f"{' '.join(str(e).split())}") from None

  def render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, the character span of each assistant message: what it
    adds after the generation prompt, its end-of-turn marker included)."""
    text = self.render(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      before = self.render(messages[:i], add_generation_prompt=True)
      after = self.render(messages[:i + 1], add_generation_prompt=False)
      if not (after.startswith(before) and text.startswith(after)):
        raise LimaError(f"data.chat_format: the chat template of {self.where} does not render "
                        "a conversation as the growing sequence of its messages, so the "
                        "assistant tokens cannot be told apart; use data.chat_format=lima")
      spans.append((len(before), len(after)))
    return text, spans
