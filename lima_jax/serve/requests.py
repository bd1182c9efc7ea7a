"""The request bodies of /v1/chat/completions and /v1/completions (OpenAI's fields, checked by
pydantic) and how they become a prompt's ids and decoding for the engine.

Decoding: a field left out takes the run's generate.* setting (the paper's decoding), not
OpenAI's default; `temperature: 0` is greedy (arg max after the repetition penalty), as OpenAI
clients and judges assume. `repetition_penalty` is an extension (vLLM's name). Fields OpenAI
defines that change nothing here (user, frequency_penalty 0, ...) are accepted and ignored.
"""

import json
from typing import Literal

import numpy as np
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from lima_jax.serve.errors import APIError
from lima_jax.serve.slots import TOP_K

# A system (or developer) message has no place in LIMA's format: its text opens the first user
# turn, separated by a blank line.
_SYSTEM_ROLES = ("system", "developer")


class _Body(BaseModel):
  model_config = ConfigDict(extra="ignore")
  model: str
  temperature: float | None = Field(None, ge=0, le=2)
  top_p: float | None = Field(None, gt=0, le=1)
  max_tokens: int | None = Field(None, ge=0)
  seed: int | None = None
  stop: str | list[str] | None = None
  stream: bool = False
  stream_options: dict | None = None
  n: int = 1
  repetition_penalty: float | None = Field(None, gt=0)
  return_token_ids: bool = False  # vLLM's extension: the prompt's and the answer's ids
  ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)

  def stops(self) -> tuple[str, ...]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stop) > 4:
      raise APIError(400, "stop: at most 4 sequences", param="stop")
    return tuple(stop)


class _TextPart(BaseModel):
  type: Literal["text"]
  text: str


class Message(BaseModel):
  role: str
  content: str | list[_TextPart] | None = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(part.text for part in self.content)
    return self.content or ""


class ChatBody(_Body):
  messages: list[Message]
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=TOP_K)

  def turns(self) -> list[str]:
    """The conversation as alternating user / assistant texts ending with a user turn."""
    if not self.messages:
      raise APIError(400, "messages: must hold at least one message", param="messages")
    system = []
    rest = list(self.messages)
    while rest and rest[0].role in _SYSTEM_ROLES:
      system.append(rest.pop(0).text())
    turns = []
    for i, message in enumerate(rest, start=len(self.messages) - len(rest)):
      want = "assistant" if len(turns) % 2 else "user"
      if message.role not in ("user", "assistant", *_SYSTEM_ROLES):
        raise APIError(400, f"messages[{i}].role: unknown role {message.role!r} (user, "
                            "assistant, or a leading system)", param=f"messages[{i}].role")
      if message.role != want:
        raise APIError(400, f"messages[{i}].role: is {message.role!r} where {want!r} must come "
                            "(an optional system message, then user and assistant in turn, "
                            "ending with user)", param=f"messages[{i}].role")
      if not message.text().strip():
        raise APIError(400, f"messages[{i}].content: is empty", param=f"messages[{i}].content")
      turns.append(message.text())
    if len(turns) % 2 == 0:
      raise APIError(400, "messages: the last message must be the user's", param="messages")
    if system:
      turns[0] = "\n\n".join(system + [turns[0]])
    return turns

  def answer_limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else \
        self.max_tokens


class CompletionBody(_Body):
  prompt: str | list[str] | list[int] | list[list[int]]
  echo: bool = False
  logprobs: int | None = Field(None, ge=0, le=TOP_K)

  def prompts(self) -> list:
    """Each prompt: a str, or a list of ids."""
    p = self.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
      return [p]
    if not p:
      raise APIError(400, "prompt: is empty", param="prompt")
    return list(p)


def parse(model_class, raw: bytes):
  """The body as `model_class`; APIError 400 naming the field for anything malformed."""
  try:
    data = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise APIError(400, f"the body is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise APIError(400, "the body must be a JSON object")
  try:
    return model_class.model_validate(data)
  except pydantic.ValidationError as e:
    first = e.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    raise APIError(400, f"{where}: {first['msg']}", param=where) from None


def decoding(body: _Body, defaults: dict) -> tuple[dict, bool, int]:
  """(settings, greedy, seed) of a request over the run's generate.* `defaults`."""
  if body.n != 1:
    raise APIError(400, f"n: only 1 is supported, got {body.n}", param="n")
  settings = {"temperature": defaults["temperature"], "top_p": defaults["top_p"],
              "repetition_penalty": defaults["repetition_penalty"],
              "penalize_prompt": defaults["penalize_prompt"]}
  greedy = bool(defaults["greedy"])
  if body.temperature is not None:
    greedy = body.temperature == 0
    settings["temperature"] = body.temperature if body.temperature > 0 else 1.0
  if body.top_p is not None:
    settings["top_p"] = body.top_p
  if body.repetition_penalty is not None:
    settings["repetition_penalty"] = body.repetition_penalty
  seed = body.seed if body.seed is not None else defaults["seed"]
  return settings, greedy, int(seed)


def answer_budget(prompt_len: int, asked: int | None, context: int, default: int, *,
                  prompt_param: str, param: str) -> int:
  """New tokens at most. A prompt must leave room in the context; an explicit max_tokens must
  fit with it (as OpenAI and vLLM refuse); a default one is cut to what fits."""
  if prompt_len >= context:
    raise APIError(400, f"the prompt is {prompt_len} tokens, but this model's context is "
                        f"{context} tokens", param=prompt_param, code="context_length_exceeded")
  if asked is None:
    return min(default, context - prompt_len)
  if prompt_len + asked > context:
    raise APIError(400, f"{param}: {asked} new tokens and the prompt's {prompt_len} exceed this "
                        f"model's context of {context} tokens", param=param,
                   code="context_length_exceeded")
  return asked


def completion_ids(prompt, tokenizer) -> np.ndarray:
  """A /v1/completions prompt as ids: ids as given; text with BOS (when the tokenizer has one)
  and no chat format: the plain language model, as lm-evaluation-harness expects."""
  if isinstance(prompt, str):
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = head + tokenizer.backend.encode(prompt)
  else:
    ids = list(prompt)
    bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
      raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                          f"[0, {tokenizer.vocab_size})", param="prompt")
  if not ids:
    raise APIError(400, "prompt: is empty", param="prompt")
  return np.asarray(ids, np.int32)
