"""tpu_scripts/: the gcloud commands each script issues, checked with --dry-run and with a fake
`gcloud` on PATH that records its arguments; the workers' shell commands run here under `sh`."""

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "tpu_scripts"
SCRIPTS = ["create", "setup", "launch", "logs", "stop", "delete"]

SETTINGS = {
    "PROJECT": "test-project",
    "ZONE": "us-east5-a",
    "TPU_NAME": "lima-test",
    "ACCELERATOR_TYPE": "v5p-32",
    "RUNTIME_VERSION": "v2-alpha-tpuv5",
    "CAPACITY": "on-demand",
    "CREATE_FLAGS": "",
    "REPO_URL": "",
    "REPO_REF": "main",
    "PYTHON_VERSION": "3.12",
    "REMOTE_DIR": "lima_jax",
    "VENV_DIR": "lima_venv",
    "LOG_DIR": "lima_logs",
    "CONFIG": "configs/lima_65b.py",
    "WORKDIR": "gs://test-bucket/lima-65b",
    "TRAIN_FLAGS": "--config.data.train_path=gs://test-bucket/train.jsonl",
}

# The fake gcloud: each call appends its arguments to $GCLOUD_LOG, each ended by NUL, the call
# ended by \x01.
FAKE_GCLOUD = """#!/bin/sh
printf '%s\\0' "$@" >>"$GCLOUD_LOG"
printf '\\001' >>"$GCLOUD_LOG"
"""


class Scripts:
  """Runs tpu_scripts/NAME.sh with a settings file, a fake gcloud and a clean environment."""

  def __init__(self, tmp_path):
    self.tmp_path = tmp_path
    self.settings = tmp_path / "settings.env"
    self.settings.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in SETTINGS.items()))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    self.log = tmp_path / "gcloud.log"
    self.home = tmp_path / "home"
    self.home.mkdir()
    # Only what the scripts need: a stray PROJECT or ZONE from the caller would override.
    self.env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(self.home),
                "TMPDIR": str(tmp_path), "GCLOUD_LOG": str(self.log), "LC_ALL": "C"}

  def run(self, name, *args, **env):
    return subprocess.run(["bash", str(SCRIPTS_DIR / f"{name}.sh"), "--settings",
                           str(self.settings), *args], env={**self.env, **env},
                          capture_output=True, text=True, timeout=60)

  def ok(self, name, *args, **env):
    result = self.run(name, *args, **env)
    assert result.returncode == 0, result.stderr
    return result

  def dry_run(self, name, *args, **env):
    """The commands printed by --dry-run, each split into its words."""
    result = self.ok(name, "--dry-run", *args, **env)
    return [shlex.split(line) for line in result.stdout.splitlines()]

  def gcloud_calls(self, name, *args, **env):
    """Runs the script for real against the fake gcloud; returns the calls' arguments."""
    self.log.unlink(missing_ok=True)
    self.ok(name, *args, **env)
    return self.calls()

  def calls(self):
    if not self.log.exists():
      return []
    return [[a.decode() for a in call.split(b"\0")[:-1]]
            for call in self.log.read_bytes().split(b"\x01")[:-1]]


@pytest.fixture
def scripts(tmp_path):
  return Scripts(tmp_path)


def flag(call, name):
  """The value of --name=VALUE in a call (None when absent)."""
  values = [a.split("=", 1)[1] for a in call if a.startswith(f"--{name}=")]
  assert len(values) <= 1, call
  return values[0] if values else None


def remote_command(call):
  assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"], call
  return flag(call, "command")


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_prints_the_commands_it_would_run_and_runs_none(scripts, name):
  printed = scripts.dry_run(name)
  assert printed and all(cmd[0] in ("gcloud", "tar") for cmd in printed), printed
  assert scripts.calls() == []
  # Running for real issues exactly the gcloud commands the dry run printed.
  issued = scripts.gcloud_calls(name)
  assert issued == [cmd[1:] for cmd in printed if cmd[0] == "gcloud"]


def test_dry_run_also_from_the_environment(scripts):
  assert scripts.run("delete", DRY_RUN="1").stdout.startswith("gcloud compute tpus tpu-vm delete")
  assert scripts.calls() == []


def test_create_on_demand(scripts):
  [call] = scripts.gcloud_calls("create")
  assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "lima-test"]
  assert flag(call, "accelerator-type") == "v5p-32"
  assert flag(call, "version") == "v2-alpha-tpuv5"
  assert flag(call, "zone") == "us-east5-a"
  assert flag(call, "project") == "test-project"
  assert "--spot" not in call and "--preemptible" not in call


@pytest.mark.parametrize("capacity,extra", [("spot", "--spot"), ("preemptible", "--preemptible")])
def test_create_spot_or_preemptible(scripts, capacity, extra):
  [call] = scripts.gcloud_calls("create", CAPACITY=capacity)
  assert call[:4] == ["compute", "tpus", "tpu-vm", "create"]
  assert extra in call
  assert flag(call, "accelerator-type") == "v5p-32"


@pytest.mark.parametrize("capacity", ["queued", "queued-spot"])
def test_create_queued_resource(scripts, capacity):
  [call] = scripts.gcloud_calls("create", CAPACITY=capacity,
                                CREATE_FLAGS="--valid-until-duration=6h --reserved")
  assert call[:5] == ["compute", "tpus", "queued-resources", "create", "lima-test"]
  assert flag(call, "node-id") == "lima-test"
  assert flag(call, "accelerator-type") == "v5p-32"
  assert flag(call, "runtime-version") == "v2-alpha-tpuv5"
  assert flag(call, "zone") == "us-east5-a"
  assert flag(call, "project") == "test-project"
  assert ("--spot" in call) == (capacity == "queued-spot")
  assert call[-2:] == ["--valid-until-duration=6h", "--reserved"]


def test_setup_copies_this_checkout_and_installs_on_all_workers(scripts):
  scp, ssh = scripts.gcloud_calls("setup")
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert flag(scp, "worker") == "all"
  archive, dest = scp[4:6]
  assert dest == "lima-test:lima_jax.tar.gz"
  with tarfile.open(archive) as tar:
    names = set(tar.getnames())
  assert {"./pyproject.toml", "./lima_jax/train.py", "./configs/lima_65b.py"} <= names
  assert not any(n.startswith("./.git/") or "__pycache__" in n for n in names)
  assert flag(ssh, "worker") == "all"
  command = remote_command(ssh)
  assert "tar -xzf lima_jax.tar.gz -C lima_jax" in command
  assert "--python 3.12 lima_venv" in command
  assert 'lima_venv/bin/pip install -q -U "jax[tpu]"' in command
  assert "lima_venv/bin/pip install -q -e lima_jax" in command
  assert "jax.device_count()" in command


def test_setup_from_a_git_url(scripts):
  [ssh] = scripts.gcloud_calls("setup", REPO_URL="https://example.com/lima_jax.git",
                               REPO_REF="v1")
  assert flag(ssh, "worker") == "all"
  command = remote_command(ssh)
  assert "git clone -q https://example.com/lima_jax.git lima_jax" in command
  assert "git -C lima_jax checkout -q v1" in command
  assert "pip install -q -e lima_jax" in command


def test_launch_runs_the_train_command_detached_on_all_workers(scripts):
  [call] = scripts.gcloud_calls("launch", "--", "--config.train.stop_after_steps=10",
                                WORKDIR="gs://test-bucket/run 2")
  assert flag(call, "worker") == "all"
  assert flag(call, "zone") == "us-east5-a" and flag(call, "project") == "test-project"
  command = remote_command(call)
  assert "nohup " in command
  train = shlex.split(command.split("nohup ", 1)[1].split(">>", 1)[0])
  assert train == ["$HOME/lima_venv/bin/python", "-m", "lima_jax.train",
                   "--config=configs/lima_65b.py", "--workdir=gs://test-bucket/run 2",
                   "--config.data.train_path=gs://test-bucket/train.jsonl",
                   "--config.train.stop_after_steps=10"]
  assert ">>$HOME/lima_logs/train.log 2>&1" in command


@pytest.mark.parametrize("args,worker", [((), "0"), (("3",), "3")])
def test_logs_tails_one_worker(scripts, args, worker):
  [call] = scripts.gcloud_calls("logs", *args)
  assert flag(call, "worker") == worker
  assert remote_command(call) == "tail -n 200 -F $HOME/lima_logs/train.log"


def test_stop_on_all_workers(scripts):
  [call] = scripts.gcloud_calls("stop")
  assert flag(call, "worker") == "all"
  assert "kill " in remote_command(call)


@pytest.mark.parametrize("capacity,expected", [
    ("spot", ["compute", "tpus", "tpu-vm", "delete", "lima-test"]),
    ("queued", ["compute", "tpus", "queued-resources", "delete", "lima-test"]),
])
def test_delete(scripts, capacity, expected):
  [call] = scripts.gcloud_calls("delete", CAPACITY=capacity)
  assert call[:5] == expected
  assert "--quiet" in call and flag(call, "zone") == "us-east5-a"
  assert ("--force" in call) == (capacity == "queued")


def test_environment_overrides_the_settings_file(scripts):
  [call] = scripts.gcloud_calls("create", ZONE="europe-west4-b", ACCELERATOR_TYPE="v5p-128")
  assert flag(call, "zone") == "europe-west4-b"
  assert flag(call, "accelerator-type") == "v5p-128"
  assert flag(call, "project") == "test-project"


def check_error(result, *words):
  assert result.returncode != 0
  assert result.stdout == ""
  message = result.stderr.strip()
  assert "\n" not in message and "error" in message, message
  for word in words:
    assert word in message


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_setting_is_one_line_error(scripts, name):
  check_error(scripts.run(name, PROJECT=""), "PROJECT")
  assert scripts.calls() == []


@pytest.mark.parametrize("name,setting", [("create", "ACCELERATOR_TYPE"),
                                          ("create", "RUNTIME_VERSION"),
                                          ("launch", "WORKDIR"), ("launch", "CONFIG")])
def test_missing_script_setting(scripts, name, setting):
  check_error(scripts.run(name, **{setting: ""}), setting)


def test_placeholder_is_refused(scripts):
  check_error(scripts.run("launch", TRAIN_FLAGS="--config.data.train_path=gs://YOUR_BUCKET/x"),
              "TRAIN_FLAGS")
  check_error(scripts.run("create", WORKDIR="gs://ok", PROJECT="YOUR_PROJECT"), "PROJECT")


@pytest.mark.parametrize("args,word", [(("--bogus",), "--bogus"), (("extra",), "extra"),
                                       (("--settings",), "--settings")])
def test_bad_arguments(scripts, args, word):
  check_error(scripts.run("create", *args), word)


def test_bad_values(scripts):
  check_error(scripts.run("create", CAPACITY="cheap"), "CAPACITY", "cheap")
  check_error(scripts.run("stop", LOG_DIR="/var/log"), "LOG_DIR")
  check_error(scripts.run("logs", "x"), "x")
  check_error(scripts.run("delete", "--settings", str(scripts.tmp_path / "nope.env")), "nope.env")


def test_help(scripts):
  for name in SCRIPTS:
    result = scripts.ok(name, "--help")
    assert "Usage" in result.stdout and "--dry-run" in result.stdout
  assert scripts.calls() == []


def test_shipped_settings_need_only_the_placeholders(scripts):
  env = {"PROJECT": "p", "WORKDIR": "gs://b/run", "TRAIN_FLAGS": ""}
  result = subprocess.run(["bash", str(SCRIPTS_DIR / "launch.sh"), "--dry-run"],
                          env={**scripts.env, **env}, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "--config=configs/lima_65b.py" in result.stdout
  result = subprocess.run(["bash", str(SCRIPTS_DIR / "create.sh"), "--dry-run"],
                          env={**scripts.env, **env}, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert "--accelerator-type=v5p-32" in result.stdout


@pytest.mark.parametrize("name", ["setup", "launch", "logs", "stop"])
def test_worker_commands_are_valid_sh(scripts, name):
  for call in scripts.gcloud_calls(name, REPO_URL="https://example.com/x.git"):
    result = subprocess.run(["sh", "-n", "-c", remote_command(call)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def subreaper():
  """Orphans (the detached training process) become children of this process, to be reaped."""
  libc = ctypes.CDLL(None, use_errno=True)
  if not sys.platform.startswith("linux") or libc.prctl(36, 1, 0, 0, 0) != 0:
    pytest.skip("needs Linux prctl(PR_SET_CHILD_SUBREAPER)")
  yield
  libc.prctl(36, 0, 0, 0, 0)


def test_launch_and_stop_on_a_worker(scripts, subreaper):
  """The workers' commands, run here with sh: a fake python stands in for training."""
  home = scripts.home
  (home / "lima_jax").mkdir()
  python = home / "lima_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text('#!/bin/sh\necho "fake python $*"\nexec sleep 120\n')
  python.chmod(0o755)

  def on_worker(name):
    [call] = scripts.gcloud_calls(name)
    return subprocess.run(["sh", "-c", remote_command(call)], cwd=home, env=scripts.env,
                          capture_output=True, text=True, timeout=60)

  started = on_worker("launch")
  assert started.returncode == 0, started.stderr
  assert "started" in started.stdout
  pid = int((home / "lima_logs" / "train.pid").read_text())
  reaper = threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True)
  reaper.start()
  try:
    log = home / "lima_logs" / "train.log"
    deadline = time.monotonic() + 10
    while "fake python" not in (log.read_text() if log.exists() else ""):
      assert time.monotonic() < deadline, "no log line from the launched process"
      time.sleep(0.05)
    assert ("fake python -m lima_jax.train --config=configs/lima_65b.py "
            "--workdir=gs://test-bucket/lima-65b") in log.read_text()

    again = on_worker("launch")
    assert again.returncode != 0 and "already running" in again.stdout

    stopped = on_worker("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    reaper.join(timeout=10)
    assert not reaper.is_alive()
    assert not (home / "lima_logs" / "train.pid").exists()
    assert "not running" in on_worker("stop").stdout
  finally:
    if reaper.is_alive():  # not reaped yet, so the pid is still ours
      os.kill(pid, signal.SIGKILL)


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
  files = sorted(str(p) for p in SCRIPTS_DIR.glob("*.sh")) + [str(SCRIPTS_DIR / "settings.env")]
  result = subprocess.run([shellcheck, "--external-sources", *files], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr
