"""Train a sentencepiece tokenizer on every turn of GAIR/lima-format JSONL files.

  python -m lima_jax.data.train_tokenizer --out tok.model --vocab_size 1000 train.jsonl dev.jsonl

The layout follows LLaMA (unk 0, bos 1, eos 2, no pad piece, BPE with byte fallback), so the toy
run exercises the same code paths as the real tokenizer. No end-of-turn piece is added: the
trainer appends EOT after the vocabulary (EOT id = piece count), as it must for LLaMA's own model.
"""

import argparse
import io
import os
import sys

import sentencepiece as spm

from lima_jax.data import conversations
from lima_jax.errors import LimaError


def read_turns(paths):
  """One tuple of turns per record, from the same validation the trainer uses (file:line errors)."""
  return [c.turns for p in paths
          for c in conversations.parse_conversations(conversations.read_source(p), p)]


def train(turns, vocab_size):
  """Returns the serialized model. Turns go in whole, newlines included, via an iterator."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(turns), model_writer=model, vocab_size=vocab_size,
        # BPE + byte fallback is what LLaMA uses; unknown characters become bytes, never <unk>.
        model_type="bpe", byte_fallback=True, split_digits=True,
        # Exact round trip of chat text: no NFKC, keep newlines, double spaces and indentation.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # The default (4192 bytes) silently skips long answers, which LIMA has plenty of.
        max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  except RuntimeError as e:
    # E.g. a vocab size that does not fit the data; keep the message, not the C++ location.
    message = str(e).strip().splitlines()[-1].rsplit("] ", 1)[-1]
    raise LimaError(f"sentencepiece (--vocab_size {vocab_size}): {message}") from None
  return model.getvalue()


def _write(path, blob):
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
      f.write(blob)
  except OSError as e:
    raise LimaError(f"--out {path}: cannot write ({e.strerror})") from None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="where to write the .model file")
  parser.add_argument("--vocab_size", type=int, default=1000,
                      help="pieces, including the 256 byte pieces and unk/bos/eos")
  parser.add_argument("files", nargs="+", help="GAIR/lima-format JSONL files (local or gs://)")
  args = parser.parse_args(argv)
  try:
    convs = read_turns(args.files)
    proto = train([t for turns in convs for t in turns], args.vocab_size)
    _write(args.out, proto)
  except LimaError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  sp = spm.SentencePieceProcessor(model_proto=proto)
  lengths, broken = [], 0
  for turns in convs:
    ids = [sp.encode(t) for t in turns]
    broken += sum(sp.decode(x) != t for x, t in zip(ids, turns))
    lengths.append(sum(map(len, ids)))
  pieces = sp.get_piece_size()
  print(f"wrote {args.out}: {pieces} pieces (the trainer's EOT id is {pieces})")
  print(f"{len(convs)} conversations, {sum(map(len, convs))} turns, "
        f"{sum(lengths) / len(lengths):.1f} tokens per conversation on average (no BOS/EOT)")
  if broken:
    print(f"error: {broken} turns do not round-trip exactly", file=sys.stderr)
    return 1
  print("round trip: exact on every turn")
  return 0


if __name__ == "__main__":
  sys.exit(main())
