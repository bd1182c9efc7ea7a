"""`python -m lima_jax.select`: choose the checkpoint as LIMA did, by reading dev generations.

  python -m lima_jax.select --workdir=workdir/toy             # report.html + report.md
  python -m lima_jax.select --workdir=workdir/toy --choose=7  # record epoch 7 and export it

The report shows every epoch's dev generations side by side with the loss, perplexity and LR
curves. --choose writes <workdir>/chosen.json and exports that epoch's params for serving: a
Hugging Face directory (--format=hf), or our params-only Orbax directory (--format=orbax, usable
as `init_from`); for a LoRA run both hold its base with the adapters merged in, and
--format=peft writes the adapters alone for `peft.PeftModel.from_pretrained`.
"""

import datetime
import os

from etils import epath

from lima_jax import report, run_files
from lima_jax.cli import ArgumentParser, fail, quiet_logs, summary
from lima_jax.errors import LimaError
from lima_jax.prompts import read_jsonl


def gather(workdir: str) -> report.Run:
  """Everything the report shows, read from the workdir."""
  run_files.check_workdir(workdir)
  steps, epochs = run_files.read_metrics(workdir)
  generations = {e: read_jsonl(run_files.generations_path(workdir, e))
                 for e in run_files.generated_epochs(workdir)}
  if not steps and not generations:
    raise LimaError(f"--workdir: {workdir} holds no metrics.jsonl and no generations; "
                    "is it a training run's directory?")
  kept = {e: _where(k) for e, k in run_files.kept_epochs(workdir).items()}
  return report.Run(workdir=workdir, steps=steps, epochs=epochs, generations=generations,
                    kept=kept, chosen=run_files.read_choice(workdir))


def _where(kept: run_files.Kept) -> str:
  return os.path.join(os.path.basename(kept.directory), str(kept.number))


def write_report(run: report.Run) -> list[str]:
  """report.html (self-contained) and report.md with its plots as report_<name>.svg."""
  root = epath.Path(run.workdir)
  plot_files = {}
  for name, svg in report.plots(run).items():
    plot_files[name] = f"report_{name}.svg"
    (root / plot_files[name]).write_text(svg + "\n")
  (root / "report.html").write_text(report.render_html(run))
  (root / "report.md").write_text(report.render_markdown(run, plot_files))
  return [str(root / "report.html"), str(root / "report.md")]


def choose(workdir: str, epoch: int, out: str, fmt: str) -> dict:
  """Exports the epoch's params to `out` and records the choice in <workdir>/chosen.json."""
  kept = run_files.locate(workdir, epoch=epoch, flag="--choose")
  if epath.Path(out).exists() and any(epath.Path(out).iterdir()):
    raise LimaError(f"--out: {out} exists and is not empty; choose a new directory")
  if fmt == "hf":
    from lima_jax import convert  # pylint: disable=import-outside-toplevel
    convert.export_hf(kept.directory, out, step=kept.number)
  elif fmt == "peft":
    _export_peft(kept, out)
  else:
    _export_orbax(kept, out, f"{workdir} epoch {epoch}")
  choice = {"epoch": epoch, "step": kept.step, "params": _where(kept),
            "export": _as_recorded(out, workdir), "format": fmt,
            "chosen_at": datetime.datetime.now().isoformat(timespec="seconds")}
  run_files.write_choice(workdir, choice)
  return choice


def _as_recorded(path: str, workdir: str) -> str:
  """A path as chosen.json records it: relative to the workdir (which holds chosen.json and the
  report) when inside it, else absolute; never relative to where select happened to run."""
  if "://" in path or "://" in workdir:
    return path
  path, root = os.path.abspath(path), os.path.abspath(workdir)
  return os.path.relpath(path, root) if os.path.commonpath([path, root]) == root else path


def _export_orbax(kept: run_files.Kept, out: str, description: str) -> None:
  # Imported here: loading params onto a mesh pulls in the whole model stack.
  from lima_jax import generate, lora_export  # pylint: disable=import-outside-toplevel
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  params_source, tokenizer = generate.open_kept(kept)
  # A LoRA run's adapters merged into its base: a plain model, usable as init_from.
  fields, params = lora_export.merged(kept, params_source)
  pretrained.save(out, params, fields, tokenizer=tokenizer, extras={}, source=description)


def _export_peft(kept: run_files.Kept, out: str) -> None:
  from lima_jax import generate, lora_export  # pylint: disable=import-outside-toplevel
  params_source, _ = generate.open_kept(kept)
  lora_export.write_peft(kept, params_source, out, flag="--format=peft")


def _parser() -> ArgumentParser:
  parser = ArgumentParser(prog="python -m lima_jax.select", description=summary(__doc__))
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  parser.add_argument("--choose", type=int, metavar="E", help="record epoch E and export it")
  parser.add_argument("--format", choices=("hf", "orbax", "peft"), default="hf",
                      help="export format for --choose (default: hf); a LoRA run's hf and "
                      "orbax exports are its merged model, peft its adapters alone")
  parser.add_argument("--out", help="export directory (default: <workdir>/export/epoch_<E>)")
  return parser


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  quiet_logs()
  try:
    if args.choose is not None:
      out = args.out or os.path.join(args.workdir, "export", f"epoch_{args.choose}")
      run_files.check_workdir(args.workdir)
      choice = choose(args.workdir, args.choose, out, args.format)
      print(f"select: chose epoch {choice['epoch']} (step {choice['step']}); "
            f"{args.format} export in {out}")
    elif args.out or args.format != "hf":
      raise LimaError("--out and --format go with --choose=E")
    paths = write_report(gather(args.workdir))
    print(f"select: report in {paths[0]} and {paths[1]}")
  except LimaError as e:
    fail(str(e))


if __name__ == "__main__":
  main()
