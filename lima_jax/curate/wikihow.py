"""wikiHow articles -> LIMA records: a category drawn first, then an article within it.

Input: JSONL, one article per line (UTF-8):

  {"title": "How to Cook an Omelette",            required
   "category": "Food and Entertaining",           optional; one of wikiHow's top categories
   "intro": "This article shows ...",             optional
   "sections": [{"heading": "Steps", "steps": ["Crack the eggs ...", ...]},
                {"heading": "Tips", "text": "..."}]}

Text fields are HTML (as scraped) or plain text with blank lines between paragraphs. The title,
with a question mark, is the prompt; the body (intro, then each section's heading and numbered
steps or text) is the response, with links, images and HTML removed. Boilerplate sections
(Tips, Warnings, References, ...) and paragraphs (author credits, view counts) are pruned, and
the usual opening "This article..." becomes "The following answer...", as in LIMA.
The file is read twice, by byte offset, so only the drawn articles are ever rendered.
"""

import collections
import html
import json
import re

from lima_jax.curate import sampling
from lima_jax.curate.text import html_to_markdown
from lima_jax.errors import LimaError

SOURCE = "wikihow"
UNCATEGORIZED = "uncategorized"

_PRUNED_SECTIONS = frozenset({
    "tips", "warnings", "things you'll need", "things you will need", "references",
    "sources and citations", "sources", "video", "related wikihows", "expert q&a",
    "community q&a", "you might also like", "ask a question", "quick summary", "did you know"})
# Headings that say nothing beyond "here is the article".
_SILENT_HEADINGS = frozenset({"steps", "method", "instructions"})
_BOILERPLATE = re.compile(
    r"^(this article (was|has been) (co-authored|written|reviewed|viewed|fact-checked)"
    r"|co-authored by|reviewed by|written by|last updated|thanks to all authors"
    r"|\d+% of (people|readers)|did you know you can|unlock (expert|staff)"
    r"|wikihow is a|this article has been viewed|references?\s*$)",
    re.IGNORECASE)
_THIS_ARTICLE = re.compile(r"^this (?:wikihow(?: article)?|article|guide)\b", re.IGNORECASE)
_HAS_TAGS = re.compile(r"</?[a-zA-Z][^>]*>")


def _as_html(text: str) -> str:
  """Plain text keeps its paragraphs; HTML passes through."""
  if _HAS_TAGS.search(text):
    return text
  return "".join(f"<p>{html.escape(p)}</p>" for p in re.split(r"\n\s*\n", text))


def _heading_key(heading: str) -> str:
  return " ".join(heading.replace("’", "'").lower().strip(" :.").split())


def render(article: dict, stats: collections.Counter) -> str:
  """The article's body as Markdown, pruned and rewritten; "" if nothing is left."""
  parts = [_as_html(article.get("intro") or "")]
  for section in article.get("sections") or []:
    heading = section.get("heading") or ""
    key = _heading_key(heading)
    if key in _PRUNED_SECTIONS:
      stats["sections_pruned"] += 1
      continue
    if key and key not in _SILENT_HEADINGS:
      parts.append(f"<p>{html.escape(heading)}</p>")
    if section.get("text"):
      parts.append(_as_html(section["text"]))
    steps = section.get("steps") or []
    if steps:
      parts.append("<ol>" + "".join(f"<li>{_as_html(s)}</li>" for s in steps) + "</ol>")
  paragraphs = []
  for p in html_to_markdown("".join(parts)).split("\n\n"):
    if _BOILERPLATE.match(p.strip()):
      stats["paragraphs_pruned"] += 1
    else:
      paragraphs.append(p)
  body = "\n\n".join(paragraphs).strip()
  rewritten = _THIS_ARTICLE.sub("The following answer", body, count=1)
  stats["intros_rewritten"] += rewritten != body
  return rewritten


def prompt(title: str) -> str:
  title = " ".join(title.split())
  return title if title.endswith(("?", ".", "!")) else title + "?"


def _index(path: str) -> tuple[dict[str, list[int]], int]:
  """category -> byte offsets of its articles, and the article count; checks every line."""
  by_category = collections.defaultdict(list)
  count = 0
  try:
    with open(path, "rb") as f:
      offset = 0
      for number, line in enumerate(f, start=1):
        if line.strip():
          article = _parse(line, f"{path}:{number}")
          category = " ".join(str(article.get("category") or "").split()) or UNCATEGORIZED
          by_category[category].append(offset)
          count += 1
        offset += len(line)
  except OSError as e:
    raise LimaError(f"cannot read wikiHow file {path}: {e.strerror or e}") from None
  return dict(by_category), count


def _parse(line: bytes, where: str) -> dict:
  try:
    article = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise LimaError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
  except json.JSONDecodeError as e:
    raise LimaError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(article, dict):
    raise LimaError(f"{where}: expected a JSON object per article")
  if not isinstance(article.get("title"), str) or not article["title"].strip():
    raise LimaError(f"{where}: the article has no `title` string")
  for key in ("intro", "category"):
    if not isinstance(article.get(key) or "", str):
      raise LimaError(f"{where}: `{key}` must be a string")
  sections = article.get("sections") or []
  if not isinstance(sections, list) or not all(_valid_section(s) for s in sections):
    raise LimaError(f"{where}: `sections` must be a list of objects with `heading`, and "
                    "`steps` (a list of strings) or `text` (a string)")
  return article


def _valid_section(section) -> bool:
  if not isinstance(section, dict):
    return False
  steps = section.get("steps") or []
  return (isinstance(section.get("heading") or "", str)
          and isinstance(section.get("text") or "", str)
          and isinstance(steps, list) and all(isinstance(s, str) for s in steps))


def curate(path: str, n: int, seed: int) -> tuple[list[dict], dict]:
  """(records, summary): n articles, a uniformly drawn category first, then an article in it."""
  by_category, total = _index(path)
  if not total:
    raise LimaError(f"{path}: no articles (the file is empty)")
  stats = collections.Counter()
  removed = collections.Counter()
  pools = {c: [int(i) for i in sampling.rng_for(seed, "articles", c).permutation(offsets)]
           for c, offsets in by_category.items()}

  with open(path, "rb") as f:
    def take(category, offset):
      f.seek(offset)
      article = json.loads(f.readline().decode("utf-8"))
      body = render(article, stats)
      if not body:
        removed["empty_after_pruning"] += 1
        return None
      return {"conversations": [prompt(article["title"]), body], "source": SOURCE}

    drawn = sampling.draw(pools, {c: 1.0 for c in pools}, n, sampling.rng_for(seed, "categories"),
                          take)

  removed["not_sampled"] = total - len(drawn) - removed["empty_after_pruning"]
  selected = collections.Counter(c for c, _ in drawn)
  summary = {
      "settings": {"articles": path, "n": n, "seed": seed},
      "removed": {k: removed[k] for k in ("empty_after_pruning", "not_sampled")},
      "per_category": {c: {"articles": len(by_category[c]), "selected": selected[c]}
                       for c in sorted(by_category)},
      "pruning": {k: stats[k] for k in ("sections_pruned", "paragraphs_pruned",
                                        "intros_rewritten")},
  }
  return [r for _, r in drawn], summary
