"""HTML -> Markdown as LIMA wants it: code blocks and lists kept, links, images and tags dropped.

`<pre>` becomes a fenced block and inline `<code>` a backtick span, both verbatim; `<ul>`/`<ol>`
items become `- ` / `1. ` lines, nested by indentation. A link keeps its text, not its URL, and
bare URLs in prose are removed. Every other tag is dropped for its text; block-level tags
(paragraphs, headings, quotes, table rows) only separate paragraphs.
"""

import html.parser
import re

# A URL stops before trailing punctuation, so "see http://x.org." keeps its full stop; the
# space before it and parentheses around it go with it.
_URL = re.compile(
    r"\s*(\()?\s*(?:(?:https?|ftp)://|www\.)\S+?(?=[.,;:!?)\]'\"]*(?:\s|$))\s*(?(1)\))",
    re.IGNORECASE)
_SPACES = re.compile(r"\s+")
# Tags that end the running paragraph (`li`, lists and `pre` are handled on their own).
_BLOCKS = frozenset({
    "p", "div", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "table", "tr",
    "thead", "tbody", "dl", "dt", "dd", "section", "article", "header", "footer", "figure",
    "details", "summary"})
_DROPPED = frozenset({"script", "style", "img", "svg", "iframe", "object", "video", "audio"})
_FENCE = re.compile(r"^(`{3,}|~{3,})[^\n]*\n.*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)


class _Markdown(html.parser.HTMLParser):
  """Collects finished blocks; inline text waits in `_inline` until a block boundary."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.blocks: list[tuple[str, bool]] = []  # (text, is a list item line)
    self._inline: list[str] = []
    self._lists: list[list] = []  # per open list: [ordered, next number]
    self._markers: list[str] = []  # per open item: its marker; later lines indent by its width
    self._marker_pending = False
    self._pre: list[str] | None = None
    self._code: list[str] | None = None  # inline <code> text
    self._dropped = 0

  def handle_starttag(self, tag, attrs):
    if tag in _DROPPED:
      # <img> never closes; only containers count toward the skipped depth.
      self._dropped += tag != "img"
    elif tag == "pre":
      self._flush()
      self._pre = []
    elif tag == "code" and self._pre is None:
      self._code = []
    elif tag in ("ul", "ol"):
      self._flush()
      self._lists.append([tag == "ol", _start(attrs)])
    elif tag == "li":
      self._flush()
      self._close_items(len(self._lists) - 1)  # HTML may leave the previous <li> open
      ordered, number = self._lists[-1] if self._lists else (False, 1)
      if self._lists:
        self._lists[-1][1] += 1
      self._markers.append(f"{number}. " if ordered else "- ")
      self._marker_pending = True
    elif tag == "br":
      if self._pre is not None:
        self._text("\n")
      else:
        self._flush()
    elif tag in _BLOCKS:
      self._flush()

  def handle_startendtag(self, tag, attrs):
    self.handle_starttag(tag, attrs)
    if tag in ("pre", "code", "ul", "ol", "li") or (tag in _DROPPED and tag != "img"):
      self.handle_endtag(tag)

  def handle_endtag(self, tag):
    if tag in _DROPPED:
      self._dropped = max(0, self._dropped - (tag != "img"))
    elif tag == "pre" and self._pre is not None:
      code, self._pre = "".join(self._pre), None
      self._emit(fenced(code))
    elif tag == "code" and self._code is not None:
      code, self._code = "".join(self._code), None
      self._inline.append(inline_code(_SPACES.sub(" ", code).strip()))
    elif tag in ("ul", "ol"):
      self._flush()
      if self._lists:
        self._lists.pop()
      self._close_items(len(self._lists))
    elif tag == "li":
      self._flush()
      self._close_items(len(self._markers) - 1)
    elif tag in _BLOCKS:
      self._flush()

  def handle_data(self, data):
    if not self._dropped:
      self._text(data)

  def _text(self, data):
    if self._pre is not None:
      self._pre.append(data)
    elif self._code is not None:
      self._code.append(data)
    else:
      self._inline.append(_URL.sub("", data))

  def _close_items(self, keep: int):
    """Closes open list items until `keep` remain."""
    del self._markers[max(keep, 0):]
    self._marker_pending = False

  def _flush(self):
    """Ends the running paragraph (or list item line)."""
    if self._code is not None:  # an unclosed <code> ends with its paragraph
      self.handle_endtag("code")
    text = _SPACES.sub(" ", "".join(self._inline)).strip()
    self._inline = []
    if text:
      self._emit(text)

  def _emit(self, text: str):
    """Adds a block, indented under the open list items; the first after <li> gets its marker."""
    outer = "".join(" " * len(m) for m in self._markers[:-1])
    item = bool(self._markers) and self._marker_pending
    if item:
      first, rest = outer + self._markers[-1], outer + " " * len(self._markers[-1])
      self._marker_pending = False
    else:
      first = rest = outer + "".join(" " * len(m) for m in self._markers[-1:])
    lines = text.split("\n")
    self.blocks.append((first + lines[0] + "".join(
        "\n" + (rest + line if line else "") for line in lines[1:]), item))

  def markdown(self) -> str:
    self._flush()
    if self._pre is not None:  # an unclosed <pre> still keeps its code
      self.handle_endtag("pre")
    out = []
    for i, (text, item) in enumerate(self.blocks):
      if i:
        # Consecutive items form one tight list; anything else is a new paragraph.
        out.append("\n" if item and self.blocks[i - 1][1] else "\n\n")
      out.append(text)
    return "".join(out)


def _start(attrs) -> int:
  value = dict(attrs).get("start") or "1"
  return int(value) if value.isdigit() else 1


def fenced(code: str) -> str:
  """A fenced block that holds `code` verbatim, with a fence longer than any run inside it."""
  code = code.strip("\n")
  longest = max((len(run) for run in re.findall(r"`{3,}", code)), default=2)
  fence = "`" * (longest + 1)
  return f"{fence}\n{code}\n{fence}"


def inline_code(code: str) -> str:
  if not code:
    return ""
  longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
  ticks = "`" * (longest + 1)
  pad = " " if "`" in code else ""
  return f"{ticks}{pad}{code}{pad}{ticks}"


def html_to_markdown(fragment: str) -> str:
  """Markdown for an HTML fragment (a post body, a wikiHow step)."""
  parser = _Markdown()
  parser.feed(fragment)
  parser.close()
  return parser.markdown()


def prose(markdown: str) -> str:
  """The text outside code, for checks on wording: code can say `my` or `I` freely."""
  return _INLINE_CODE.sub(" ", _FENCE.sub(" ", markdown))
