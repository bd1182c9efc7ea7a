"""Shared by the evaluation's tests: the CLI in a subprocess, small studies, local servers."""

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def evaluate(*args, check=True):
  """`python -m lima_jax.evaluate ARGS`: the CompletedProcess (text)."""
  done = subprocess.run([sys.executable, "-m", "lima_jax.evaluate", *map(str, args)], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=300)
  if check and done.returncode:
    raise AssertionError(f"evaluate {args} failed:\n{done.stderr}")
  return done


@contextlib.contextmanager
def database(study):
  """The study's SQLite database, closed on exit (an open reader keeps its WAL files, which a
  copy of the directory could then catch half gone)."""
  db = sqlite3.connect(os.path.join(study, "study.sqlite"))
  try:
    yield db
  finally:
    db.close()


def write_prompts(path, prompts):
  """A GAIR/lima-format file of single-turn prompts."""
  with open(path, "w", encoding="utf-8") as f:
    for text in prompts:
      f.write(json.dumps({"conversations": [text], "source": "test"}) + "\n")


def write_generations(path, prompts, answers):
  """Answers in `python -m lima_jax.generate`'s output format."""
  with open(path, "w", encoding="utf-8") as f:
    for line, (prompt, answer) in enumerate(zip(prompts, answers), start=1):
      f.write(json.dumps({"line": line, "source": "test", "prompt": prompt,
                          "generation": answer, "tokens": 3, "stopped": "eot"}) + "\n")


def make_study(folder, prompts, systems, *, shared):
  """A study of `prompts` with {system: answers}, made through the CLI."""
  study = os.path.join(folder, "study")
  write_prompts(os.path.join(folder, "prompts.jsonl"), prompts)
  evaluate("new", f"--study={study}", f"--prompts={folder}/prompts.jsonl", f"--shared={shared}")
  for name, answers in systems.items():
    path = os.path.join(folder, f"{name}.jsonl")
    write_generations(path, prompts, answers)
    evaluate("add", f"--study={study}", f"--system={name}", f"--answers={path}")
  return study


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for(url, proc, timeout=120):
  """Polls `url` until it answers; fails early if `proc` (the server) died."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
    try:
      httpx.get(url, timeout=2)
      return
    except httpx.TransportError:
      time.sleep(0.2)
  raise AssertionError(f"{url} did not answer in {timeout}s")


def start_module(module, *args, url):
  """`python -m MODULE ARGS` serving at `url`: the Popen, once it answers."""
  proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait_for(url, proc)
  return proc


def stop(proc):
  if proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
