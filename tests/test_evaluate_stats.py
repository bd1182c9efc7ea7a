"""The evaluation's statistics against values computed by hand."""

import numpy as np
import pytest

from lima_jax.evaluate import stats


@pytest.mark.parametrize("first, second, expected", [
    ("x", "x", 1.0),  # agreement
    ("x", "tie", 0.5),  # exactly one chose "neither"
    ("tie", "x", 0.5),
    ("tie", "tie", 1.0),  # both ties: they agree
    ("x", "y", 0.0),  # disagreement
])
def test_tie_discounted_accuracy_per_item(first, second, expected):
  assert stats.tie_discounted_accuracy({0: first}, {0: second}) == (1, expected)


def test_tie_discounted_accuracy_on_a_vote_set():
  # Items 0-4 both judged: agree, one tie, both ties, disagree, one tie -> (1+.5+1+0+.5)/5.
  # Item 5 only the first judged, item 6 only the second: not counted.
  first = {0: "x", 1: "tie", 2: "tie", 3: "x", 4: "y", 5: "x"}
  second = {0: "x", 1: "y", 2: "tie", 3: "y", 4: "tie", 6: "x"}
  assert stats.tie_discounted_accuracy(first, second) == (5, pytest.approx(3 / 5))
  assert stats.tie_discounted_accuracy(first, {9: "x"}) == (0, None)


def test_win_tie_loss_from_both_orders():
  # (order 0, order 1) verdicts for system "lima" against "gpt": two wins agree, one loss
  # agrees, two pairs disagree (ties), one tie both times.
  pairs = [("lima", "lima"), ("lima", "lima"), ("gpt", "gpt"), ("lima", "gpt"),
           ("gpt", "lima"), ("tie", "tie"), ("lima", "tie")]
  outcomes = [stats.outcome("lima", stats.both_orders(a, b)) for a, b in pairs]
  assert outcomes == ["win", "win", "loss", "tie", "tie", "tie", "tie"]
  assert stats.shares(outcomes) == pytest.approx({"win": 2 / 7, "tie": 4 / 7, "loss": 1 / 7})
  assert stats.shares([]) == {"win": 0.0, "tie": 0.0, "loss": 0.0}


def test_bootstrap_interval_covers_a_known_proportion_at_its_nominal_rate():
  # 400 samples of 100 Bernoulli(0.43) draws (LIMA's "equal or preferred" against GPT-4): the
  # 95% interval must hold 0.43 about 95% of the time. The percentile bootstrap runs a little
  # narrow at n=100, so the band is 0.90-0.98 (a binomial 400 x 0.95 has sd 0.011).
  p, hits, trials = 0.43, 0, 400
  rng = np.random.default_rng(1)
  for seed in range(trials):
    low, high = stats.bootstrap_interval(rng.random(100) < p, seed=seed, samples=1000)
    hits += low <= p <= high
  assert 0.90 <= hits / trials <= 0.98, hits / trials
  # A wrong level moves the rate: the 50% interval holds p about half the time.
  narrow = sum(low <= p <= high for low, high in (
      stats.bootstrap_interval(rng.random(100) < p, seed=s, samples=1000, level=0.5)
      for s in range(trials)))
  assert 0.38 <= narrow / trials <= 0.62


def test_bootstrap_interval_of_constant_and_empty_values():
  assert stats.bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)
  low, high = stats.bootstrap_interval([])
  assert np.isnan(low) and np.isnan(high)
  assert stats.share_interval(["win"] * 3 + ["loss"], "loss", seed=0)[1] <= 0.75 + 1e-9
