"""The safetensors file format, read memory-mapped and written tensor by tensor.

The format is an 8-byte little-endian header size, a JSON header mapping each name to its dtype,
shape and byte range, then the raw bytes. Reading it ourselves gives true zero-copy views (also
for bfloat16, which numpy lacks and `ml_dtypes` supplies); writing it ourselves streams one tensor
at a time instead of building a whole shard in memory.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from lima_jax.errors import LimaError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # a corrupt size field must not make us read gigabytes


def read_header(path: str) -> dict:
  """{name: {'dtype', 'shape', 'data_offsets'}} plus the data start as '__data_start__'."""
  try:
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      if size > _MAX_HEADER:
        raise ValueError(f"header size {size} is implausible")
      header = json.loads(f.read(size))
  except (OSError, ValueError, struct.error) as e:
    raise LimaError(f"{path}: not a readable safetensors file ({e})") from None
  header.pop("__metadata__", None)
  header["__data_start__"] = 8 + size
  return header


class SafetensorsFiles:
  """Every tensor of a set of safetensors files, by name, as read-only memory maps."""

  def __init__(self, paths):
    self._where = {}
    for path in paths:
      header = read_header(path)
      start = header.pop("__data_start__")
      for name, entry in header.items():
        self._where[name] = (path, start, entry)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple:
    return tuple(self._where[name][2]["shape"])

  def get(self, name: str) -> np.ndarray:
    path, start, entry = self._where[name]
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise LimaError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    # A map per tensor, released with the view: touched pages of a file-wide map would stay in
    # this process's RSS until the end, adding up to the whole model.
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
    return raw.view(dtype).reshape(entry["shape"])


def write(path: str, entries) -> None:
  """Writes `entries`, a list of (name, shape, dtype, produce) with produce() -> the array.

  The header comes from the declared shapes, so each array is produced, written and dropped in
  turn: the file never exists whole in memory.
  """
  header, offset = {}, 0
  for name, shape, dtype, _ in entries:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(path + ".partial", "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, dtype, produce in entries:
      array = np.ascontiguousarray(produce(), dtype=dtype)
      if array.shape != tuple(shape):
        raise ValueError(f"{name}: produced shape {array.shape}, declared {tuple(shape)}")
      f.write(array.reshape(-1).view(np.uint8).data)
  os.replace(path + ".partial", path)
