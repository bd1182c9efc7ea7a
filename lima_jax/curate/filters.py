"""LIMA's quality filters for Stack Exchange, each a named predicate so the summary can count it.

Titles must stand on their own (the paper keeps questions "self-contained in the title"); the top
answer must score at least 10, be 1,200 to 4,096 characters of Markdown, and read like an
assistant: no first person, no references to other answers or to the site. Wording checks skip
code, where `I` or `my` are names, not voice.
"""

import dataclasses
import re

from lima_jax.curate.text import prose

_QUESTION_WORDS = frozenset("""
how what why when where which who whom whose is are am was were can could should would will shall
do does did has have had may might must isn't aren't wasn't weren't can't couldn't shouldn't
wouldn't won't doesn't don't didn't hasn't haven't
""".split())
# Titles that point at something only the body shows ("what does this code do?").
_POINTS_AT_BODY = re.compile(
    r"\b(this|these|the following|following|below|above|attached|shown|here)\b", re.IGNORECASE)
_MIN_TITLE_WORDS = 4

# "I" only as a capital word: lowercase "i" is usually an index variable that escaped the code.
_FIRST_PERSON = re.compile(r"\bI\b|\b(?i:me|my|mine|myself)\b")
# Capital "I" that is not the writer: I/O, roman numerals ("Type I error", "World War I").
_NOT_A_PERSON = re.compile(
    r"\bI/O\b|\b(?:type|part|phase|class|war|chapter|section|stage|level|volume|article|appendix"
    r"|schedule|figure|table|grade)\s+I\b", re.IGNORECASE)
# Other answers, the asker, votes, edits, or the site by name ("stack overflow" with a space is
# also the programming error, so only the one-word site name counts).
_OTHER_ANSWERS = re.compile(r"""
  \bas\ (?:already\ |previously\ )?(?:mentioned|noted|stated|said|pointed\ out|suggested)\b
  | \bas\ (?:others|other\ answers|someone|somebody)\b
  | \b(?:other|another|previous|earlier|accepted|top|above|below)\ (?:answers?|posters?|replies)\b
  | \banswers?\ (?:above|below)\b
  | \b(?:this|my)\ answer\b
  | \bstack\ ?exchange\b | \bstackoverflow\b
  | \bthis\ (?:site|forum|thread)\b
  | \b(?:up|down)-?vot(?:e|ed|es|ing)\b
  | \bthe\ OP\b | \bOP's\b | \bthe\ (?:original\ )?poster\b
  | \bin\ the\ comments\b
  | (?:^|\n)\W*(?:edit|update)\s*\d*\s*:
""", re.IGNORECASE | re.VERBOSE)


def title_self_contained(title: str) -> bool:
  """A question in a few words that does not lean on the body."""
  words = title.split()
  if len(words) < _MIN_TITLE_WORDS:
    return False
  is_question = title.rstrip().endswith("?") or words[0].lower().strip(",:") in _QUESTION_WORDS
  return is_question and not _POINTS_AT_BODY.search(title)


def first_person(markdown: str) -> bool:
  return bool(_FIRST_PERSON.search(_NOT_A_PERSON.sub(" ", prose(markdown))))


def refers_to_others(markdown: str) -> bool:
  return bool(_OTHER_ANSWERS.search(prose(markdown)))


# In the order they apply, which is the order of the summary's counts.
ANSWER_FILTERS = ("answer_score_below_min", "answer_too_short", "answer_too_long",
                  "answer_first_person", "answer_refers_to_others")


@dataclasses.dataclass(frozen=True)
class AnswerRules:
  min_score: int = 10
  min_chars: int = 1200
  max_chars: int = 4096


def answer_verdict(score: int, markdown: str, rules: AnswerRules) -> str | None:
  """The name of the first filter that rejects a top answer, or None if it is kept."""
  if score < rules.min_score:
    return "answer_score_below_min"
  if len(markdown) < rules.min_chars:
    return "answer_too_short"
  if len(markdown) > rules.max_chars:
    return "answer_too_long"
  if first_person(markdown):
    return "answer_first_person"
  if refers_to_others(markdown):
    return "answer_refers_to_others"
  return None
