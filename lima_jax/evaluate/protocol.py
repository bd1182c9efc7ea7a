"""The questions LIMA (Zhou et al. 2023) asked people and GPT-4, asked the same way here.

Pairwise (section 3, "Methodology"): a rater sees one prompt and two answers from different
systems in random order and says which is significantly better, or that neither is; GPT-4 got
the same instructions and data as the people. Absolute (section 4.3): each answer is Fail, Pass
or Excellent. Helpfulness (section 5): a judge grades an answer on a 1-6 scale. The judge
answers with one letter or digit, so its verdict can be read from that token's probabilities.
"""

import dataclasses

MODES = ("pairwise", "absolute", "helpfulness")
TIE = "tie"


@dataclasses.dataclass(frozen=True)
class Choice:
  key: str  # the judge's answer token and the page's keyboard key
  value: str  # stored: 'left'/'right'/'tie', a rating, or a score
  label: str


# The paper's three choices (section 3): "A is significantly better", "B is significantly
# better", "neither is significantly better". The page shows the two answers as A (left) and B.
PAIRWISE = (Choice("A", "left", "A is significantly better"),
            Choice("B", "right", "B is significantly better"),
            Choice("N", TIE, "Neither is significantly better"))

# Section 4.3's definitions, word for word.
ABSOLUTE = (Choice("F", "fail", "Fail: the response did not meet the requirements of the prompt"),
            Choice("P", "pass", "Pass: the response met the requirements of the prompt"),
            Choice("E", "excellent",
                   "Excellent: the model provided an excellent response to the prompt"))

# Section 5: helpfulness on a 1-6 Likert scale (the paper's template is its appendix D; these
# anchors are ours).
HELPFULNESS = tuple(Choice(str(n), str(n), f"{n}: {text}") for n, text in (
    (1, "not helpful at all: off topic, wrong or harmful"),
    (2, "barely helpful: mostly misses what was asked"),
    (3, "somewhat helpful: partly answers, with errors or gaps"),
    (4, "helpful: answers the question with minor flaws"),
    (5, "very helpful: a complete, correct and clear answer"),
    (6, "extremely helpful: could not be improved")))

CHOICES = {"pairwise": PAIRWISE, "absolute": ABSOLUTE, "helpfulness": HELPFULNESS}

INSTRUCTIONS = {
    "pairwise": ("You will see a prompt and two responses to it, A and B, written by two "
                 "different systems and shown in random order. Decide whether one response is "
                 "significantly better than the other: A is significantly better, B is "
                 "significantly better, or neither is significantly better."),
    "absolute": ("You will see a prompt and one response to it. Rate the response: Fail if it "
                 "did not meet the requirements of the prompt, Pass if it met them, Excellent "
                 "if the model provided an excellent response to the prompt."),
    "helpfulness": ("You will see a prompt and one response to it. Rate how helpful the "
                    "response is on a scale from 1 (not helpful at all) to 6 (extremely "
                    "helpful)."),
}


def judge_messages(mode: str, turns: list[str], answers: list[str]) -> list[dict]:
  """Chat messages asking the judge `mode`'s question about one prompt (its turns, the last
  one the user's) and one answer, or two (pairwise, in the order given: the first is A)."""
  keys = "/".join(c.key for c in CHOICES[mode])
  history = "".join(f"[{'User' if i % 2 == 0 else 'Assistant'}]\n{t}\n\n"
                    for i, t in enumerate(turns[:-1]))
  parts = [f"{history}[Prompt]\n{turns[-1]}"]
  if mode == "pairwise":
    parts += [f"[Response A]\n{answers[0]}", f"[Response B]\n{answers[1]}"]
  else:
    parts.append(f"[Response]\n{answers[0]}")
  legend = "\n".join(f"{c.key} = {c.label}" for c in CHOICES[mode])
  parts.append(f"Answer with exactly one of {keys} and nothing else.\n{legend}")
  return [{"role": "system", "content": INSTRUCTIONS[mode]},
          {"role": "user", "content": "\n\n".join(parts)}]


def parse_reply(mode: str, text: str) -> str | None:
  """The choice value a judge's reply text holds, else None (an unparseable reply is never a
  verdict): its first word, as a choice's key ("A", "E", "5") or its label's first word
  ("Neither", "Excellent")."""
  words = (text or "").strip().split()
  if not words:
    return None
  first = words[0].strip(".,:;!*()[]\"'").upper()
  for choice in CHOICES[mode]:
    if first in (choice.key, choice.label.split()[0].strip(":").upper()):
      return choice.value
  return None
