"""How well a run's kept epochs end their answers: p(EOT) at the EOT targets of the dev answers.

  python bench/eot_probability.py WORKDIR EPOCH [EPOCH ...] [--dev lima_jax/sample_data/dev.jsonl]

Teacher-forced: each dev conversation (the run's tokenizer and chat format, up to the run's
data.max_length) goes through the epoch's params (a LoRA run's adapters and trained rows joined
to its base) once, and at every assistant turn's EOT target it prints the median, min and max
of p(EOT), 1/V for reference (a new EOT row frozen at the mean of the others stays below it),
and how often EOT is the arg max.
"""

import argparse

import jax
import numpy as np

from lima_jax import config, data, generate, run_files


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir")
  parser.add_argument("epochs", type=int, nargs="+")
  parser.add_argument("--dev", default=config.sample_data("dev.jsonl"))
  args = parser.parse_args()
  for epoch in args.epochs:
    kept = run_files.locate(args.workdir, epoch=epoch)
    source, tok = generate.open_kept(kept)
    trainer, params = generate.restore_kept(kept, source)
    length = kept.meta["config"]["data"]["max_length"]
    examples = data.load_examples(args.dev, tok, what="--dev", max_length=length,
                                  train_on_prompt=False,
                                  data_dir=data.prepared_dir(args.workdir, ""))
    tokens = np.zeros((len(examples), length), np.int32)
    segments = np.zeros_like(tokens)
    for i, e in enumerate(examples):
      tokens[i, :len(e.ids) - 1], segments[i, :len(e.ids) - 1] = e.ids[:-1], 1
    positions = np.tile(np.arange(length, dtype=np.int32), (len(examples), 1))
    logits = np.asarray(jax.jit(lambda p, t, q, s: trainer.model(p)(t, q, s))(
        params, tokens, positions, segments))
    probs, best = [], []
    for i, e in enumerate(examples):
      at = np.nonzero((e.ids[1:] == tok.eot_id) & (e.loss_mask[1:] > 0))[0]
      p = np.asarray(jax.nn.softmax(logits[i, at], axis=-1))
      probs += list(p[:, tok.eot_id])
      best += list(p.argmax(-1) == tok.eot_id)
    probs = np.asarray(probs)
    print(f"epoch {epoch}: {len(probs)} EOT targets, p(EOT) median {np.median(probs):.3g} "
          f"(min {probs.min():.3g}, max {probs.max():.3g}; 1/V = {1 / tok.vocab_size:.3g}), "
          f"arg max at {int(np.sum(best))}", flush=True)


if __name__ == "__main__":
  main()
