"""Model answers shown in pages people read: Markdown rendered, then sanitised.

Answers are untrusted text (a model can write `<script>` or `<img onerror=...>`). markdown-it
renders CommonMark with raw HTML disabled (it comes out escaped, as text), and nh3 (ammonia)
then keeps only an allow-list of tags and attributes, so nothing in an answer runs in the page,
whatever markdown-it lets through. One renderer for every page: the selection report and the
evaluation's rating page show an answer the same way.
"""

import nh3
from markdown_it import MarkdownIt

_RENDERER = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}
                       ).enable(["table", "strikethrough"])
_TAGS = {"p", "br", "hr", "em", "strong", "del", "code", "pre", "blockquote", "ul", "ol", "li",
         "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "a"}
_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "th": {"style"}, "td": {"style"}}


def to_html(text: str) -> str:
  """Safe HTML (str) for a Markdown answer (str): no script, event handler, style sheet, image
  or raw HTML from the answer survives; links keep http(s) and mailto targets only and get
  rel="noopener noreferrer"."""
  return nh3.clean(_RENDERER.render(text or ""), tags=_TAGS, attributes=_ATTRIBUTES,
                   url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer")
