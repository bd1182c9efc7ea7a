"""The numbers LIMA (Zhou et al. 2023) reports, computed from votes and verdicts.

- win / tie / loss shares (Figure 1), with "equal or preferred" = win + tie;
- a judge's verdict from both orders of a pair: the same winner both times is that winner, two
  different answers are a tie (MT-Bench's convention, Zheng et al. 2023);
- tie-discounted accuracy between two raters (section 3, "Inter-annotator agreement"): 1 point
  when they agree, 0.5 when exactly one of them chose "neither", 0 otherwise;
- 95% percentile-bootstrap intervals (Arena-Hard bootstraps its intervals; the paper's section
  5 reports helpfulness means with 95% intervals).
"""

import numpy as np

from lima_jax.evaluate.protocol import TIE

BOOTSTRAP_SAMPLES = 2000  # resamples per interval: its 2.5% tails rest on 50 draws each
LEVEL = 0.95


def both_orders(first: str, second: str) -> str:
  """One verdict from a pair judged in both orders; each is a winner's name or 'tie'."""
  return first if first == second else TIE


def outcome(system: str, verdict: str) -> str:
  """'win', 'tie' or 'loss' for `system`, from a verdict naming the winner (or 'tie')."""
  if verdict == TIE:
    return "tie"
  return "win" if verdict == system else "loss"


def shares(outcomes: list[str]) -> dict[str, float]:
  """{'win', 'tie', 'loss'} -> the share (0..1) of outcomes; all 0 when there are none."""
  n = len(outcomes)
  return {k: (outcomes.count(k) / n if n else 0.0) for k in ("win", "tie", "loss")}


def tie_discounted_accuracy(first: dict, second: dict) -> tuple[int, float | None]:
  """(items both raters judged, their tie-discounted accuracy) for two raters' labels
  ({item: winner name or 'tie'}); None when they judged no item in common."""
  common = sorted(set(first) & set(second))
  if not common:
    return 0, None
  points = [1.0 if first[k] == second[k] else 0.5 if TIE in (first[k], second[k]) else 0.0
            for k in common]
  return len(common), float(np.mean(points))


def bootstrap_interval(values, *, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                       level: float = LEVEL) -> tuple[float, float]:
  """The percentile-bootstrap interval (low, high) of the mean of `values` (floats; 0/1 for a
  share): `samples` resamples with replacement, drawn with `seed`. (nan, nan) when empty."""
  values = np.asarray(values, dtype=np.float64)
  if values.size == 0:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(low), float(high)


def share_interval(outcomes: list[str], which: str, *, seed: int = 0) -> tuple[float, float]:
  """The bootstrap interval of the share of `which` ('win', 'tie' or 'loss') in outcomes."""
  return bootstrap_interval([o == which for o in outcomes], seed=seed)
