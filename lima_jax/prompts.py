"""Prompt files in, generation files out.

Prompts come in the GAIR/lima format (`{"conversations": [...], "source": ...}`), read and
validated like training data. A record ending with a user turn is a prompt as it stands (the
test set's form); one ending with an assistant turn (a dev example) is prompted with everything
before that answer, which is kept as the reference. Prompts are formatted exactly as in
training (`ChatTokenizer.encode_prompt`: in the lima format BOS, then every utterance followed by
EOT; in the template format the chat template with its generation prompt).
"""

import dataclasses
import json

import numpy as np
from absl import logging
from etils import epath

from lima_jax.data import ChatTokenizer, read_conversations
from lima_jax.errors import LimaError


@dataclasses.dataclass(frozen=True)
class Prompt:
  turns: tuple[str, ...]  # ends with the user turn to answer
  source: str
  line: int  # 1-based line in the prompts file
  ids: np.ndarray
  reference: str | None  # the record's own answer, when it has one


def load_prompts(path: str, tokenizer: ChatTokenizer, *, data_dir: str, context: int,
                 what: str | None = None, skip_long: bool = False) -> list[Prompt]:
  """Every prompt of a JSONL file, in file order.

  A prompt must leave room in the context (data.max_length) for an answer: a longer one is an
  error naming its line, or with skip_long a warning (a dev set may hold long examples).
  """
  prompts, too_long = [], []
  for record in read_conversations(path, data_dir, what=what):
    answered = len(record.turns) % 2 == 0
    turns = record.turns[:-1] if answered else record.turns
    ids = tokenizer.encode_prompt(turns)
    if len(ids) >= context:
      message = (f"{path}:{record.line}: the prompt is {len(ids)} tokens, but the context holds "
                 f"{context} (data.max_length) including the answer")
      if not skip_long:
        raise LimaError(message)
      too_long.append(record.line)
      continue
    prompts.append(Prompt(turns=turns, source=record.source, line=record.line, ids=ids,
                          reference=record.turns[-1] if answered else None))
  if too_long:
    logging.warning("%s: skipped %d prompt(s) that leave no room for an answer in %d tokens "
                    "(lines %s)", path, len(too_long), context, ", ".join(map(str, too_long)))
  if not prompts:
    raise LimaError(f"{path}: no prompt fits the context of {context} tokens")
  return prompts


def generation_records(prompts, generations, tokenizer: ChatTokenizer) -> list[dict]:
  """One JSON-ready record per prompt: the prompt, the generated text and how it ended:
  stopped "eot" when the model ended its answer (EOT or one of its own end ids,
  `ChatTokenizer.stop_ids`; `stop_token` names which), "length" when it ran out of tokens."""
  records = []
  for prompt, ids in zip(prompts, generations):
    stopped = len(ids) > 0 and int(ids[-1]) in tokenizer.stop_ids
    record = {"line": prompt.line, "source": prompt.source, "prompt": prompt.turns[-1],
              "generation": tokenizer.decode(ids), "tokens": int(len(ids)),
              "stopped": "eot" if stopped else "length"}
    if stopped:
      last = int(ids[-1])
      record["stop_token"] = (tokenizer.eot_text if last == tokenizer.eot_id
                              else tokenizer.token_text(last))
    if len(prompt.turns) > 1:
      record["history"] = list(prompt.turns[:-1])
    if prompt.reference is not None:
      record["reference"] = prompt.reference
    records.append(record)
  return records


def write_jsonl(path: str, records) -> None:
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file we wrote; a damaged line is an error naming it."""
  records = []
  for number, line in enumerate(epath.Path(path).read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise LimaError(f"{path}:{number}: invalid JSON ({e.msg})") from None
  return records
