"""`python -m lima_jax.serve`: an OpenAI-compatible HTTP server for a run's model (chat
completions, completions, models; streaming, logprobs), with continuous batching.

  python -m lima_jax.serve --workdir=workdir/toy --epoch=5
  python -m lima_jax.serve --model=~/.cache/lima_jax/models/smollm2-135m-instruct \
      --chat_format=template --eot_token='<|im_end|>' --port=8000 --api_key=secret

Binds 127.0.0.1 unless --host says otherwise. Requests' missing decoding fields take the run's
generate.* settings; `temperature: 0` is greedy. SIGTERM (or Ctrl-C) stops taking requests and
finishes those in flight. See docs/serving.md.
"""

import os
import signal
import time

from lima_jax.cli import (ArgumentParser, fail, quiet_logs, summary, use_compile_cache,
                          use_fake_cpu_devices)
from lima_jax.errors import LimaError

API_KEY_ENV = "LIMA_JAX_API_KEY"


def _parser() -> ArgumentParser:
  from lima_jax.serve import loading  # pylint: disable=import-outside-toplevel
  parser = ArgumentParser(prog="python -m lima_jax.serve", description=summary(__doc__))
  loading.add_source_flags(parser)
  add_engine_flags(parser)
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1: this machine only)")
  parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
  parser.add_argument("--api_key", "--api-key", default=None,
                      help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV};"
                           " unset: no key)")
  parser.add_argument("--served_model_name", "--served-model-name", default=None,
                      help="the model id clients send and /v1/models lists (default: the run's "
                           "or model directory's name)")
  return parser


def add_engine_flags(parser) -> None:
  """Flags the server and the terminal chat share."""
  parser.add_argument("--slots", type=int, default=8,
                      help="requests decoded at once (batch rows of the KV cache); more wait "
                           "for a free slot (default 8)")
  parser.add_argument("--compile_cache", default="~/.cache/lima_jax/jax",
                      help="directory keeping compiled steps for the next start ('' = off)")


def start_engine(args):
  """(the loaded model, a started Engine) for the parsed flags; LimaError for user mistakes."""
  # pylint: disable=import-outside-toplevel
  from lima_jax.serve import loading
  from lima_jax.serve.engine import Engine
  from lima_jax.serve.slots import SlotModel
  if args.slots < 1:
    raise LimaError(f"--slots={args.slots}: must be at least 1")
  use_compile_cache(args.compile_cache)
  loaded = loading.load(args)
  model = SlotModel(loaded.trainer, loaded.params, slots=args.slots, context=loaded.context)
  return loaded, Engine(model, loaded.tokenizer).start()


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  quiet_logs()
  use_fake_cpu_devices(1)  # one process, one device: the training mesh's fake CPUs buy nothing
  api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "")
  try:
    _serve(args, api_key)
  except LimaError as e:
    fail(str(e))


def _serve(args, api_key: str) -> None:
  # pylint: disable=import-outside-toplevel
  import uvicorn
  from lima_jax.serve.api import create_app
  started = time.perf_counter()
  loaded, engine = start_engine(args)
  name = args.served_model_name or loaded.name
  app = create_app(engine, name=name, context=loaded.context, defaults=loaded.generate,
                   api_key=api_key)
  print(f"serving {loaded.where} as {name!r} on http://{args.host}:{args.port}/v1 "
        f"({args.slots} slots, context {loaded.context}; loaded in "
        f"{time.perf_counter() - started:.1f}s)", flush=True)
  # uvicorn's own SIGTERM handling drains: it stops accepting, lets the responses in flight
  # finish (timeout_graceful_shutdown None: however long they take), then returns here.
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                          timeout_graceful_shutdown=None)
  # uvicorn raises the signal again once drained; handled here, the process ends normally.
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: None)
  try:
    uvicorn.Server(config).run()
  finally:
    engine.close()
  print("server stopped", flush=True)


if __name__ == "__main__":
  main()
