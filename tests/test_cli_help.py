"""`--help` of the absl commands (train, plan, demo) lists the flags a user types, and exits 0
as the argparse commands' --help does."""

import re
import subprocess
import sys

import pytest

from helpers import ROOT

# The flags each command reads: config_cli's shared ones and the command's own.
SHARED = {"config", "show_config"}
EXPECTED = {
    "train": SHARED | {"workdir", "multihost"},
    "plan": SHARED | {"topology", "num_examples", "mfu", "json"},
    "demo": SHARED | {"workdir"},
}


def _help(module, flag):
  return subprocess.run([sys.executable, "-m", f"lima_jax.{module}", flag], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_help_lists_the_commands_flags_and_exits_0(module):
  proc = _help(module, "--help")
  assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-1000:]
  listed = set(re.findall(r"^  --(?:\[no\])?([a-z_]+)", proc.stdout, re.MULTILINE))
  assert EXPECTED[module] <= listed, f"missing {EXPECTED[module] - listed} in\n{proc.stdout}"
  assert f"python -m lima_jax.{module}" in proc.stdout  # the command's docstring comes first
  assert "--config.KEY=VALUE" in proc.stdout  # how overrides are written
  if module == "demo":  # the default shown is the one the demo uses
    assert re.search(r"\(default: '[^']*smollm2_demo\.py'\)", proc.stdout), proc.stdout
    assert "multihost" not in listed  # read by train's main only, not by the demo


def test_short_help_flag_works_like_argparse_commands():
  proc = _help("train", "-h")
  assert proc.returncode == 0, proc.stderr[-1000:]
  assert "--workdir" in proc.stdout and "--config" in proc.stdout
