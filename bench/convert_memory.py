"""Peak host memory of an HF -> Orbax import of a ~1.1B-parameter LLaMA, per largest tensor.

  python bench/convert_memory.py [--workdir DIR] [--devices 8]

Writes a random TinyLlama-shaped model (d 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632,
vocabulary 32,000, bf16 safetensors) tensor by tensor, and a 32,000-piece tokenizer, then runs the
import in a fresh process and prints its peak RSS as a multiple of the largest tensor (the fp32
embedding). On a CPU the "devices" are host memory too, so the placed params themselves count
in RSS; the second ratio subtracts them (and the process's RSS before the import) to show what
the streaming costs beyond the result.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

SHAPE = dict(vocab_size=32_000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)


def _tokenizer(path: str, pieces: int) -> None:
  """The sample tokenizer grown to `pieces` pieces (the importer checks the count)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  from lima_jax.config import sample_data  # pylint: disable=import-outside-toplevel
  proto = sentencepiece_model_pb2.ModelProto()
  with open(sample_data("tokenizer.model"), "rb") as f:
    proto.ParseFromString(f.read())
  for i in range(len(proto.pieces), pieces):
    proto.pieces.add(piece=f"<extra_{i}>", score=-1e6, type=proto.pieces[-1].NORMAL)
  with open(path, "wb") as f:
    f.write(proto.SerializeToString())


def write_model(hf_dir: str) -> int:
  """Random bf16 weights, one tensor in memory at a time; returns the parameter count."""
  from lima_jax.weights import safetensors_io  # pylint: disable=import-outside-toplevel
  s = SHAPE
  d, f, v, hd = (s["hidden_size"], s["intermediate_size"], s["vocab_size"],
                 s["hidden_size"] // s["num_attention_heads"])
  kv = s["num_key_value_heads"] * hd
  layer = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
           "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
           "mlp.down_proj": (d, f), "input_layernorm": (d,), "post_attention_layernorm": (d,)}
  rng = np.random.default_rng(0)

  def random(shape):
    return lambda: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

  files = [[("model.embed_tokens.weight", (v, d)), ("lm_head.weight", (v, d)),
            ("model.norm.weight", (d,))]]
  for i in range(s["num_hidden_layers"]):
    if i % 6 == 0:
      files.append([])
    files[-1] += [(f"model.layers.{i}.{n}.weight", shape) for n, shape in layer.items()]
  os.makedirs(hf_dir, exist_ok=True)
  count = 0
  for i, group in enumerate(files):
    name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    safetensors_io.write(os.path.join(hf_dir, name),
                         [(n, shape, ml_dtypes.bfloat16, random(shape)) for n, shape in group])
    count += sum(int(np.prod(shape)) for _, shape in group)
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as out:
    json.dump(dict(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama",
                   rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False), out)
  _tokenizer(os.path.join(hf_dir, "tokenizer.model"), v)
  return count


def _current_rss() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def child(hf_dir: str, out_dir: str) -> None:
  """The import itself, in a fresh process so its peak RSS is its own."""
  import jax  # pylint: disable=import-outside-toplevel
  from lima_jax import convert  # pylint: disable=import-outside-toplevel
  from lima_jax.weights import hf  # pylint: disable=import-outside-toplevel
  jax.devices()
  before = _current_rss()
  started = time.perf_counter()
  source = hf.HfSource(hf_dir)
  convert.import_model(source, out_dir)
  print(json.dumps({"rss_before": before, "peak_rss": convert.peak_rss_bytes(),
                    "seconds": time.perf_counter() - started, "devices": jax.device_count()}))


def _run(*args, env=None) -> list[str]:
  """This script in a fresh process; its stdout lines, or its stderr and exit on failure."""
  done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                        text=True, check=False)
  if done.returncode:
    sys.exit(f"{' '.join(args[:1])} failed:\n{done.stderr[-4000:]}")
  return done.stdout.strip().splitlines()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="where the model is written (default: a temp dir)")
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices to shard over")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  parser.add_argument("--write", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child)
    return
  if args.write:
    t0 = time.perf_counter()
    params = write_model(args.write)
    print(f"wrote a random {params / 1e9:.2f}B-parameter model in "
          f"{time.perf_counter() - t0:.0f}s (writer peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
    print(params)
    return
  with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
    hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "orbax")
    # Both steps run in their own process: a child's peak RSS starts at its parent's at fork.
    wrote = _run("--write", hf_dir)
    print(wrote[0], flush=True)
    params = int(wrote[-1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={args.devices}").strip())
    result = json.loads(_run("--child", hf_dir, out_dir, env=env)[-1])
  padded = -(-(SHAPE["vocab_size"] + 1) // 128) * 128
  largest = SHAPE["vocab_size"] * SHAPE["hidden_size"] * 4  # the fp32 embedding
  placed = (params + 2 * (padded - SHAPE["vocab_size"]) * SHAPE["hidden_size"]) * 4
  peak, before = result["peak_rss"], result["rss_before"]
  gib = 2**30
  print(f"import of {params / 1e9:.2f}B params over {result['devices']} CPU devices: "
        f"{result['seconds']:.0f}s")
  print(f"  largest tensor (fp32 embedding)   {largest / gib:6.2f} GiB")
  print(f"  params placed on the devices      {placed / gib:6.2f} GiB")
  print(f"  RSS before the import             {before / gib:6.2f} GiB")
  print(f"  peak RSS                          {peak / gib:6.2f} GiB")
  print(f"peak RSS / largest tensor: {peak / largest:.1f}x")
  print(f"(peak - before - placed params) / largest tensor: "
        f"{(peak - before - placed) / largest:.1f}x")


if __name__ == "__main__":
  main()
