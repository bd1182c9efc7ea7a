"""Serving speed of `python -m lima_jax.serve` on SmolLM2-135M-Instruct (fp32, greedy), against
transformers' `generate` on the same weights, and the memory-bandwidth bound of a decode step.

  python bench/serve.py              # a table, then one JSON line
  python bench/serve.py --new 64     # shorter answers

One run, one machine: the server (its own process, one CPU device, --slots 16) answers C
concurrent streaming clients for C in 1, 4, 16, each asking the same prompt for exactly --new
tokens (greedy, `ignore_eos`); tokens/s is all generated tokens over the wall time of the round,
time to first token the median over its clients. Each concurrency runs once unmeasured first
(compiles). Then transformers' `generate` (the GGUF dequantised by transformers, fp32, greedy,
min_new_tokens = max_new_tokens = --new, torch threads = cores) on the same prompt ids, in this
process after the server's rounds. The bound: a decode step must read every weight once (and
the rows' KV cache), so one client cannot beat memory bandwidth / weight bytes tokens per second;
the bandwidth is a large array copy timed here (read + write bytes per second).

Goals: 1 client >= 1.0x transformers; 16 clients >= 6x the tokens/s of 1 client. On a shared
machine absolute times drift: the figures are ratios measured minutes apart.
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

PROMPT = ("Explain, in a few short paragraphs, why the sky looks blue during the day and red "
          "at sunset.")
CHAT = ["--chat_format=template", "--eot_token=<|im_end|>"]


def stream_once(client, new: int) -> tuple[float, float, int]:
  """(seconds to the first token, seconds in all, tokens) of one streamed greedy answer."""
  started = time.perf_counter()
  first, tokens = None, 0
  for chunk in client.chat.completions.create(
      model="smollm2", messages=[{"role": "user", "content": PROMPT}], temperature=0,
      max_tokens=new, stream=True, stream_options={"include_usage": True},
      extra_body={"ignore_eos": True}):
    if chunk.choices and chunk.choices[0].delta.content and first is None:
      first = time.perf_counter() - started
    if chunk.usage:
      tokens = chunk.usage.completion_tokens
  return first or 0.0, time.perf_counter() - started, tokens


def round_of(server, clients: int, new: int) -> dict:
  results = [None] * clients
  client = server.client()

  def one(i):
    results[i] = stream_once(client, new)

  started = time.perf_counter()
  threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - started
  tokens = sum(r[2] for r in results)
  return {"tokens_per_s": tokens / wall, "ttft_s": statistics.median(r[0] for r in results),
          "tokens": tokens, "wall_s": wall}


def transformers_speed(gguf: str, prompt_ids, new: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count())
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
  ids = torch.tensor([prompt_ids])
  kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                attention_mask=torch.ones_like(ids))
  with torch.inference_mode():
    model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=kwargs["attention_mask"])
    started = time.perf_counter()
    out = model.generate(ids, **kwargs)
    wall = time.perf_counter() - started
  made = out.shape[1] - ids.shape[1]
  return {"tokens_per_s": made / wall, "tokens": made, "wall_s": wall,
          "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def bandwidth() -> float:
  """Bytes per second of a 512 MiB fp32 copy (read + write), best of 3."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  a = np.ones(128 << 20, np.float32)
  b = np.empty_like(a)
  best = float("inf")
  for _ in range(3):
    started = time.perf_counter()
    np.copyto(b, a)
    best = min(best, time.perf_counter() - started)
  return 2 * a.nbytes / best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--new", type=int, default=128, help="tokens per answer")
  parser.add_argument("--concurrency", default="1,4,16")
  args = parser.parse_args()
  # pylint: disable=import-outside-toplevel
  from lima_jax import demo, fetch
  from lima_jax.data import load_tokenizer
  from serve_process import Server
  weights = demo.prepare_weights()
  levels = [int(c) for c in args.concurrency.split(",")]
  server = Server(f"--model={weights}", *CHAT, "--served_model_name=smollm2",
                  f"--slots={max(levels)}", "--context=512")
  rounds = {}
  try:
    for clients in levels:
      round_of(server, clients, args.new)  # compiles this many rows
      rounds[clients] = round_of(server, clients, args.new)
      print(f"serve, {clients:2d} clients: {rounds[clients]['tokens_per_s']:7.1f} tokens/s, "
            f"first token after {rounds[clients]['ttft_s']:.3f}s", flush=True)
  finally:
    server.stop()
  tokenizer = load_tokenizer(weights, eot_token="<|im_end|>", chat_format="template")
  prompt_ids = tokenizer.encode_prompt([PROMPT]).tolist()
  reference = transformers_speed(fetch.smollm2_gguf(), prompt_ids, args.new)
  print(f"transformers generate: {reference['tokens_per_s']:7.1f} tokens/s", flush=True)
  bytes_per_s = bandwidth()
  bound = bytes_per_s / reference["weight_bytes"]
  one, most = rounds[levels[0]], rounds[levels[-1]]
  report = {
      "prompt_tokens": len(prompt_ids), "new_tokens": args.new,
      "serve_tokens_per_s": {str(c): round(r["tokens_per_s"], 2) for c, r in rounds.items()},
      "serve_ttft_s": {str(c): round(r["ttft_s"], 4) for c, r in rounds.items()},
      "transformers_tokens_per_s": round(reference["tokens_per_s"], 2),
      "one_client_vs_transformers": round(one["tokens_per_s"] / reference["tokens_per_s"], 3),
      f"{levels[-1]}_clients_vs_one": round(most["tokens_per_s"] / one["tokens_per_s"], 3),
      "memory_bandwidth_gb_s": round(bytes_per_s / 1e9, 2),
      "weight_bytes": reference["weight_bytes"],
      "one_client_bound_tokens_per_s": round(bound, 2),
      "one_client_vs_bound": round(one["tokens_per_s"] / bound, 3),
  }
  print(f"1 client vs transformers: {report['one_client_vs_transformers']:.2f}x (goal >= 1.0); "
        f"{levels[-1]} clients vs 1: {report[f'{levels[-1]}_clients_vs_one']:.2f}x (goal >= 6); "
        f"1 client at {report['one_client_vs_bound']:.0%} of the bandwidth bound "
        f"({bound:.1f} tokens/s at {report['memory_bandwidth_gb_s']} GB/s)")
  print(json.dumps(report))


if __name__ == "__main__":
  main()
