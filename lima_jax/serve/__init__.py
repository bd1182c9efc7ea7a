"""Serving a model: an OpenAI-compatible HTTP server (`python -m lima_jax.serve`) and the engine
it shares with the terminal chat (`python -m lima_jax.chat`).

  loading.py   a run's params (or any init_from source), its tokenizer, context and decoding
  slots.py     the compiled prefill and decode step over batch slots of one KV cache
  engine.py    the scheduler thread: continuous batching of requests onto the slots
  text.py      ids -> text as it streams: stop strings, incomplete UTF-8 held back
  requests.py  the API's request bodies (pydantic), checked against the model
  api.py       the FastAPI routes and OpenAI's response and SSE shapes
  errors.py    OpenAI's error object for every refusal
"""
