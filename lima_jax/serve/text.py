"""An answer's text as its tokens arrive: what can be sent now, and where a stop string ends it.

Text is decoded from all ids so far (a byte-level token may be half a character: its U+FFFD is
held back until the next token completes it) and a tail that could still grow into a stop string
is held back too, so a streamed answer never shows text its non-streamed twin cuts off.
"""

REPLACEMENT = "\ufffd"


class TextTail:
  """Feed ids with `add`; `sent` is what has been released. `stop` strings end the answer
  before their first occurrence (OpenAI's rule: the stop string itself is not returned)."""

  def __init__(self, decode, stop: tuple[str, ...] = ()):
    self.decode, self.stop = decode, tuple(s for s in stop if s)
    self.ids: list[int] = []
    self.sent = ""
    self.stopped = False  # a stop string was found

  def add(self, token: int) -> str:
    """The newly releasable text after `token` ('' while held back)."""
    self.ids.append(token)
    text = self.decode(self.ids)
    cut = self._stop_at(text)
    if cut is not None:
      self.stopped = True
      return self._release(text[:cut])
    return self._release(text[:len(text) - self._held(text)])

  def finish(self) -> str:
    """What is left once no token follows (a held tail that never became a stop string)."""
    if self.stopped:
      return ""
    return self._release(self.decode(self.ids))

  def _release(self, text: str) -> str:
    if not text.startswith(self.sent) or len(text) <= len(self.sent):
      return ""  # decoding may rewrite earlier text (rare): never take back what was sent
    new, self.sent = text[len(self.sent):], text
    return new

  def _stop_at(self, text: str):
    # Search only where a new stop could start: it cannot lie wholly in the sent text.
    start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
    found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
    return min(found) if found else None

  def _held(self, text: str) -> int:
    held = len(text) - len(text.rstrip(REPLACEMENT))
    for s in self.stop:
      for size in range(min(len(s) - 1, len(text)), 0, -1):
        if text.endswith(s[:size]):
          held = max(held, size)
          break
    return held
