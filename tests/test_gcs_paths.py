"""gs:// data and tokenizer paths go through etils.epath -> fsspec, as on a TPU VM; here an
in-memory filesystem stands in for GCS behind the same protocol names."""

import json
import os

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from helpers import ROOT
from lima_jax import config, data, metrics, train
from lima_jax.config import sample_data


class FakeGcs(MemoryFileSystem):
  protocol = ("gs", "gcs")

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes GCS options
    del finalize_on_close
    super().__init__(*args, **kwargs)


@pytest.fixture()
def bucket():
  # No other test touches gs://, so the stand-in stays registered for this process.
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGcs, clobber=True)
  fs = fsspec.filesystem("gs")
  for name in ("train.jsonl", "dev.jsonl", "tokenizer.model"):
    fs.put(sample_data(name), f"gs://bucket/lima/{name}")
  yield fs
  fs.rm("gs://bucket", recursive=True)


def test_training_setup_reads_gs_paths(bucket, tmp_path):
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  for key in ("train_path", "dev_path", "tokenizer_path"):
    cfg.data[key] = f"gs://bucket/lima/{os.path.basename(cfg.data[key])}"
  cfg.model.n_layers, cfg.data.max_length = 1, 64
  setup = train.prepare(cfg, str(tmp_path))
  assert len(setup.examples) == 70 and setup.dev is not None
  assert setup.tokenizer.sha256 == data.load_tokenizer(sample_data("tokenizer.model")).sha256


def test_a_bad_line_in_a_gs_file_names_it(bucket, tmp_path):
  with bucket.open("gs://bucket/bad.jsonl", "w") as f:
    f.write(json.dumps({"conversations": ["q", "a"]}) + "\n{broken\n")
  with pytest.raises(Exception, match=r"gs://bucket/bad.jsonl:2"):
    data.read_conversations("gs://bucket/bad.jsonl", str(tmp_path))


def test_a_remote_workdir_prepares_data_locally():
  assert data.prepared_dir("gs://bucket/run").endswith(os.path.join(".cache", "lima_jax", "tfds"))
  assert data.prepared_dir("/runs/a") == "/runs/a/tfds"
  assert data.prepared_dir("gs://bucket/run", "/local/tfds") == "/local/tfds"


def test_a_remote_workdir_gets_the_metrics_files(bucket, tmp_path, monkeypatch):
  """Before, metrics.jsonl, epochs.jsonl and the TensorBoard events of a gs:// workdir went to a
  local folder named 'gs:' under the current directory, and never reached the bucket."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the local mirror lives under ~/.cache
  monkeypatch.chdir(tmp_path)
  workdir = "gs://bucket/run"

  def record(step):
    return {"step": step, "epoch": 1, "loss": 2.0, "lr": 1e-5, "grad_norm": 1.0, "tokens": 10,
            "step_time": 0.1, "tokens_per_s": 100.0}

  def steps(name):
    with bucket.open(f"{workdir}/{name}", "r") as f:
      return [json.loads(line)["step"] for line in f]

  reporter = metrics.RunReporter(workdir, total_steps=3, initial_step=0)
  reporter.step(record(1))
  reporter.step(record(2))
  reporter.epoch(1, {"train_loss": 2.0}, 2)
  assert steps("metrics.jsonl") == [1, 2] and steps("epochs.jsonl") == [2]  # at the epoch's end
  reporter.step(record(3))
  reporter.close()
  assert steps("metrics.jsonl") == [1, 2, 3]
  assert bucket.glob(f"{workdir}/tensorboard/events.out.tfevents.*")
  # A run resumed from step 2 continues the bucket's files, without the rows after step 2.
  metrics.RunReporter(workdir, total_steps=3, initial_step=2).close()
  assert steps("metrics.jsonl") == [1, 2]
  assert not os.path.exists(tmp_path / "gs:")
