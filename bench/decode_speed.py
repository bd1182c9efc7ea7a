"""Decode speed with the KV cache against recomputing the whole prefix for every token.

  python bench/decode_speed.py [--d_model 256 --layers 4 --batch 8 --prompt 64 --new 64]

Both are compiled loops over the same random model on a mesh of every local device, greedy with
the paper's repetition penalty, and both produce the same tokens (checked). Each is compiled
first, then timed on a second call; the ratio is cached over recomputed tokens per second.
"""

import argparse
import time

import jax
import numpy as np
import optax

from lima_jax import sharding
from lima_jax.decoding import Decoding, Generator
from lima_jax.model import LlamaConfig
from lima_jax.train_state import Trainer


def _args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32_001)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
  parser.add_argument("--new", type=int, default=64, help="generated tokens per row")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  return parser.parse_args()


def _timed(generator, params, prompts, new, use_cache):
  """(seconds of the compiling call, seconds of the timed call, tokens)."""
  kwargs = dict(max_new=new, context=len(prompts[0]) + new, decoding=Decoding(greedy=True),
                use_cache=use_cache)
  times = []
  for _ in range(2):
    started = time.perf_counter()
    out = generator.generate(params, prompts, **kwargs)
    times.append(time.perf_counter() - started)
  return times[0], times[1], out


def main():
  args = _args()
  ffn = args.d_model * 8 // 3 // 8 * 8  # LLaMA's 8/3 d, a multiple of 8
  cfg = LlamaConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                    n_heads=args.heads, n_kv_heads=args.heads, ffn_dim=ffn,
                    compute_dtype=args.dtype)
  mesh = sharding.make_mesh(1, -1, 1)
  trainer = Trainer(cfg, optax.identity(), optax.constant_schedule(0.0), mesh, 0)
  params = trainer.init(0)["params"]
  # The EOT id is a padding id past the vocabulary: never chosen, so every row runs to --new.
  generator = Generator(trainer, stop_ids=cfg.vocab_size, batch_size=args.batch)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, args.vocab - 1, args.prompt).astype(np.int32)
             for _ in range(args.batch)]
  print(f"model d={cfg.d_model} layers={cfg.n_layers} vocab={cfg.vocab_size} {args.dtype}; "
        f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}")
  rates = {}
  outputs = {}
  for name, use_cache in (("kv cache", True), ("full prefix", False)):
    compile_s, run_s, outputs[name] = _timed(generator, params, prompts, args.new, use_cache)
    rates[name] = args.batch * args.new / run_s
    print(f"{name:>11}: {rates[name]:9.1f} tokens/s ({run_s:.2f}s; first call with compile "
          f"{compile_s:.2f}s)")
  same = all(np.array_equal(a, b) for a, b in zip(outputs["kv cache"], outputs["full prefix"]))
  print(f"same tokens: {same}")
  print(f"decode speed-up, kv cache / full prefix: {rates['kv cache'] / rates['full prefix']:.1f}x")


if __name__ == "__main__":
  main()
