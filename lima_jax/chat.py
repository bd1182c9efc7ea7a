"""`python -m lima_jax.chat`: talk with a run's model in the terminal, on the serving engine;
the answer streams as it is generated, each turn sees the whole conversation so far.

  python -m lima_jax.chat --workdir=workdir/toy --epoch=5
  python -m lima_jax.chat --model=~/.cache/lima_jax/models/smollm2-135m-instruct \
      --chat_format=template --eot_token='<|im_end|>'

Commands (a line starting with /):
  /reset              start a new conversation
  /set KEY=VALUE ...  change decoding: temperature, top_p, repetition_penalty, max_tokens, seed,
                      greedy (on/off); the run's generate.* settings to begin with
  /show               the decoding in use
  /save PATH          append the conversation to PATH as a GAIR/lima JSONL record
                      ({"conversations": [...], "source": "lima_jax.chat"}): training data
  /help, /quit        (end of input or Ctrl-D quits too; Ctrl-C stops an answer)
"""

import json
import queue
import sys

import ml_collections

from lima_jax import config
from lima_jax.cli import ArgumentParser, fail, quiet_logs, summary, use_fake_cpu_devices
from lima_jax.errors import LimaError
from lima_jax.serve import loading
from lima_jax.serve.__main__ import add_engine_flags, start_engine
from lima_jax.serve.engine import Finished, Piece, Request
from lima_jax.serve.errors import APIError
from lima_jax.serve.requests import answer_budget

_KINDS = {"temperature": float, "top_p": float, "repetition_penalty": float, "max_tokens": int,
          "seed": int, "greedy": lambda v: {"on": True, "off": False, "true": True,
                                            "false": False, "1": True, "0": False}[v.lower()]}


class Conversation:
  """The turns so far and the decoding of the next answer, on a started Engine."""

  def __init__(self, engine, loaded, out=sys.stdout):
    self.engine, self.loaded, self.out = engine, loaded, out
    self.turns: list[str] = []
    self.decoding = dict(loaded.generate)

  def command(self, line: str) -> bool:
    """Runs a /command; False for /quit."""
    name, _, rest = line[1:].partition(" ")
    if name == "quit":
      return False
    if name == "reset":
      self.turns = []
      self.say("(new conversation)")
    elif name == "set":
      self.set(rest.split())
    elif name == "show":
      self.say(" ".join(f"{k}={self.decoding[k]}" for k in _KINDS))
    elif name == "save":
      self.save(rest.strip())
    elif name == "help":
      self.say(__doc__.split("Commands (a line starting with /):\n")[1].rstrip())
    else:
      self.say(f"unknown command /{name}; /help lists them")
    return True

  def set(self, pairs: list[str]) -> None:
    changed = dict(self.decoding)
    try:
      for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in _KINDS:
          raise ValueError(f"{key!r} is not one of {', '.join(_KINDS)}")
        changed[key] = _KINDS[key](value)
    except (ValueError, KeyError) as e:
      self.say(f"/set: {e}")
      return
    problems = config.generate_problems(ml_collections.ConfigDict(changed))
    if problems:
      self.say(f"/set: {problems[0][0]} {problems[0][1]}")
      return
    self.decoding = changed
    self.command("/show")

  def save(self, path: str) -> None:
    if not path:
      self.say("/save: give a file, e.g. /save dialogues.jsonl")
    elif not self.turns:
      self.say("/save: the conversation is empty")
    else:
      try:
        with open(path, "a", encoding="utf-8") as f:
          f.write(json.dumps({"conversations": self.turns, "source": "lima_jax.chat"},
                             ensure_ascii=False) + "\n")
      except OSError as e:
        self.say(f"/save: {e}")
        return
      self.say(f"(saved {len(self.turns)} turns to {path})")

  def answer(self, text: str) -> None:
    """Streams the model's answer to `text`, then keeps both in the conversation."""
    ids = self.loaded.tokenizer.encode_prompt(self.turns + [text])
    try:
      limit = answer_budget(len(ids), None, self.loaded.context, self.decoding["max_tokens"],
                            prompt_param="conversation", param="max_tokens")
    except APIError as e:
      self.say(f"({e.message}; /reset starts afresh)")
      return
    events = queue.Queue()
    d = self.decoding
    request = Request(ids=ids, settings={k: d[k] for k in ("temperature", "top_p",
                                                           "repetition_penalty",
                                                           "penalize_prompt")},
                      greedy=bool(d["greedy"]), seed=int(d["seed"]), max_new=limit,
                      sink=events.put)
    self.engine.submit(request)
    pieces = []
    try:
      while not isinstance(event := events.get(), Finished):
        if isinstance(event, Piece):
          pieces.append(event.text)
          self.out.write(event.text)
          self.out.flush()
    except KeyboardInterrupt:
      request.cancel()
      event = Finished("interrupted", len(ids), len(pieces))
    self.out.write("\n")
    if event.reason == "error":
      self.say(f"(generation failed: {event.message})")
      return
    if event.reason == "interrupted":
      self.say("(stopped)")
    elif event.reason == "length" and limit < self.decoding["max_tokens"]:
      self.say(f"(cut at the model's context of {self.loaded.context} tokens; /reset starts "
               "afresh, a smaller /set max_tokens leaves room for more turns)")
    elif event.reason == "length":
      self.say("(cut at max_tokens)")
    self.turns += [text, "".join(pieces)]

  def say(self, line: str) -> None:
    self.out.write(line + "\n")
    self.out.flush()


def _parser() -> ArgumentParser:
  parser = ArgumentParser(prog="python -m lima_jax.chat", description=summary(__doc__))
  loading.add_source_flags(parser)
  add_engine_flags(parser)
  parser.set_defaults(slots=1)
  return parser


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  quiet_logs()
  use_fake_cpu_devices(1)
  try:
    loaded, engine = start_engine(args)
  except LimaError as e:
    fail(str(e))
  conversation = Conversation(engine, loaded)
  conversation.say(f"chatting with {loaded.where}; /help lists the commands")
  interactive = sys.stdin.isatty()
  try:
    while True:
      try:
        line = input("> " if interactive else "")
      except EOFError:
        break
      except KeyboardInterrupt:
        conversation.say("")
        continue
      line = line.strip()
      if not line:
        continue
      if line.startswith("/"):
        if not conversation.command(line):
          break
      else:
        conversation.answer(line)
  finally:
    engine.close()


if __name__ == "__main__":
  main()
