"""Sampling across pools (sites, categories) so that large pools do not crowd out small ones.

LIMA samples Stack Exchange sites with temperature tau = 3: a site of size n is drawn with
probability proportional to n^(1/tau), which flattens the size differences (tau = 1 would be
proportional to size, tau -> infinity uniform). Each draw takes the next item of the drawn pool;
a pool that runs dry drops out and the others are renormalised.
"""

import collections
import zlib
from typing import Callable

import numpy as np


def temperature_probabilities(sizes: dict[str, int], tau: float) -> dict[str, float]:
  """name -> probability proportional to size^(1/tau); empty pools get 0."""
  if tau <= 0:
    raise ValueError(f"tau must be positive, got {tau}")
  names = sorted(sizes)
  weights = np.array([max(sizes[n], 0) for n in names], dtype=np.float64) ** (1.0 / tau)
  total = weights.sum()
  if total == 0:
    return {n: 0.0 for n in names}
  return {n: float(w / total) for n, w in zip(names, weights)}


def draw(pools: dict[str, list], weights: dict[str, float], n: int, rng: np.random.Generator,
         take: Callable[[str, object], object] | None = None) -> list[tuple[str, object]]:
  """Up to n (pool name, item) pairs: pick a pool by weight, take its next item.

  Pools are consumed front to back, so their order decides what a draw gets (best first for
  Stack Exchange, a seeded shuffle for wikiHow). `take(name, item)` may turn an item into what
  is returned, or reject it with None, and the draw is repeated. Stops early when every pool
  is empty.
  """
  queues = {name: collections.deque(items) for name, items in sorted(pools.items())}
  picked = []
  while len(picked) < n:
    names = [k for k, q in queues.items() if q and weights.get(k, 0) > 0]
    if not names:
      break
    p = np.array([weights[k] for k in names], dtype=np.float64)
    name = names[rng.choice(len(names), p=p / p.sum())]
    item = queues[name].popleft()
    if take is not None:
      item = take(name, item)
    if item is not None:
      picked.append((name, item))
  return picked


def rng_for(seed: int, *parts: str | int) -> np.random.Generator:
  """A generator fixed by the seed and a purpose, so one choice never shifts another's draws.

  Strings are hashed with crc32: Python's own hash() changes from run to run.
  """
  keys = [seed] + [p if isinstance(p, int) else zlib.crc32(p.encode("utf-8")) for p in parts]
  return np.random.default_rng(keys)
