"""What XLA:CPU adds to a bf16 program that a TPU would not: f32 copies of bf16 arguments.

`lima_jax.plan` compiles the train step for fake CPU devices. XLA:CPU has no bf16 arithmetic or
bf16 dynamic-slice, so its `float-normalization-bf16` pass wraps every bf16 op in converts to f32;
for a bf16 array the scan slices per layer (LoRA's frozen base in `model.param_dtype=bfloat16`)
that makes a convert of the whole [layers, ...] stack inside the loop, which loop-invariant code
motion then hoists out: an f32 copy of every bf16 param, live for the whole step (measured on a
small LoRA model: the temporaries of a bf16 base exceed an fp32 base's by exactly these copies).
A TPU reads bf16 natively and makes none. Full fine-tuning in fp32 has no bf16 argument, so
nothing is found there.
"""

import math
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_PARAMETER = re.compile(r"%(\S+) = bf16\[([\d,]*)\]\S* parameter\(\d+\)")
# `%x = f32[...] convert(%param)`, or a loop fusion of that one convert.
_CONVERT = re.compile(r"%\S+ = f32\[([\d,]*)\]\S* (convert|fusion)\(%([^),]+)\)(.*)")
_CALLS = re.compile(r"calls=%([^,\s]+)")


def _computations(hlo: str) -> tuple[dict, str | None]:
  """{name: its instruction lines} of an HLO module's text, and the entry computation's name."""
  out, entry, name = {}, None, None
  for line in hlo.splitlines():
    found = _COMPUTATION.match(line)
    if found:
      name = found.group(2)
      out[name] = []
      entry = name if found.group(1) else entry
    elif line.startswith("}"):
      name = None
    elif name is not None:
      out[name].append(line.strip())
  return out, entry


def _only_convert(lines: list) -> bool:
  ops = [line for line in lines if " parameter(" not in line]
  return len(ops) == 1 and " convert(" in ops[0]


def f32_copies_of_bf16_arguments(hlo: str) -> int:
  """Bytes per device of the f32 copies that the entry computation of a compiled module's text
  (`Compiled.as_text()`, after SPMD partitioning: per-device shapes) makes of its bf16
  parameters, each a convert or a fusion of one convert; 0 when there are none."""
  computations, entry = _computations(hlo)
  if entry is None:
    return 0
  lines = computations[entry]
  bf16 = {m.group(1): m.group(2) for m in map(_PARAMETER.search, lines) if m}
  total = 0
  for found in map(_CONVERT.search, lines):
    if not found or bf16.get(found.group(3)) != found.group(1):
      continue
    if found.group(2) == "fusion":
      called = _CALLS.search(found.group(4))
      if not called or not _only_convert(computations.get(called.group(1), [])):
        continue
    dims = [int(d) for d in found.group(1).split(",") if d]
    total += math.prod(dims) * 4  # f32
  return total
