"""`python -m lima_jax.evaluate`: LIMA's evaluation of a system's answers against others', by
people and by an LLM judge (Zhou et al. 2023, sections 3-5).

  python -m lima_jax.evaluate new --study=study --prompts=lima_jax/sample_data/dev.jsonl
  python -m lima_jax.evaluate add --study=study --system=tuned --answers=answers.jsonl
  python -m lima_jax.evaluate add --study=study --system=base --workdir=workdir/toy --epoch=0
  python -m lima_jax.evaluate annotate --study=study --system=tuned --against=base
  python -m lima_jax.evaluate import-votes --study=study --rater=crowd --file=votes.csv
  python -m lima_jax.evaluate judge --study=study --system=tuned --against=base \\
      --endpoint=http://127.0.0.1:8000/v1 --model=judge
  python -m lima_jax.evaluate report --study=study
"""

import argparse
import asyncio
import os

from lima_jax.cli import (ArgumentParser, fail, quiet_logs, summary, use_compile_cache,
                          use_fake_cpu_devices)
from lima_jax.errors import LimaError
from lima_jax.evaluate import protocol
from lima_jax.evaluate.store import Study


def _parser() -> ArgumentParser:
  parser = ArgumentParser(prog="python -m lima_jax.evaluate", description=summary(__doc__))
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  new = commands.add_parser("new", help="a study of a prompts file")
  new.add_argument("--study", required=True, help="the study's directory (new)")
  new.add_argument("--prompts", required=True, help="JSONL in the GAIR/lima format")
  new.add_argument("--shared", type=int, default=50,
                   help="items every rater gets, for agreement (the paper: 50); the rest are "
                   "spread across raters")
  new.add_argument("--seed", type=int, default=0,
                   help="draws the shared items and every rater's sides")

  add = commands.add_parser("add", help="a system's answers to the study's prompts")
  add.add_argument("--study", required=True)
  add.add_argument("--system", required=True, help="the system's name in votes and reports")
  source = add.add_mutually_exclusive_group(required=True)
  source.add_argument("--answers", action="append",
                      help="generate's JSONL output or AlpacaEval's JSON list; repeat for more "
                      "samples per prompt")
  source.add_argument("--workdir", help="generate the answers now from this run's params, "
                      "with the run's (the paper's) decoding")
  source.add_argument("--model", help="generate the answers now from a model directory "
                      "(anything init_from accepts, e.g. the SmolLM2 import)")
  add.add_argument("--epoch", type=int,
                   help="with --workdir: the epoch's params (default: its latest checkpoint)")
  add.add_argument("--chat_format", choices=("lima", "template"),
                   help="with --model: how prompts become ids (default: as the model records)")
  add.add_argument("--eot_token", default="", help="with --model: the token that ends a turn")
  add.add_argument("--samples", type=int, default=1,
                   help="when generating: answers per prompt, each with its own seed")
  add.add_argument("--seed", type=int, default=0, help="when generating: the first sample's seed")
  add.add_argument("--max_tokens", type=int,
                   help="when generating: new tokens per answer at most (default: the run's "
                   "generate.max_tokens)")

  annotate = commands.add_parser("annotate", help="the rating page for people")
  _task_flags(annotate)
  annotate.add_argument("--host", default="127.0.0.1")
  annotate.add_argument("--port", type=int, default=8765)

  votes = commands.add_parser("import-votes", help="votes collected elsewhere (JSONL or CSV)")
  votes.add_argument("--study", required=True)
  votes.add_argument("--rater", required=True, help="the name these votes are counted under")
  votes.add_argument("--file", required=True,
                     help="rows of item, a, b, winner (.csv with a header, else JSONL)")

  judge = commands.add_parser("judge", help="an LLM judge over an OpenAI-compatible endpoint")
  _task_flags(judge)
  judge.add_argument("--endpoint", required=True,
                     help="the API's base URL, e.g. http://127.0.0.1:8000/v1")
  judge.add_argument("--model", required=True, help="the model name the endpoint expects")
  judge.add_argument("--api_key_env", default="OPENAI_API_KEY",
                     help="the environment variable holding the API key, if any")
  judge.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
  judge.add_argument("--retries", type=int, default=4,
                     help="retries after 429, 5xx, a timeout or a dropped connection")
  judge.add_argument("--backoff", type=float, default=1.0,
                     help="seconds before the first retry; doubled each time")
  judge.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
  judge.add_argument("--max_tokens", type=int, default=8, help="reply tokens at most")
  judge.add_argument("--top_logprobs", type=int, default=20,
                     help="alternatives asked for at the verdict token")
  judge.add_argument("--no_logprobs", action="store_true",
                     help="read verdicts from the reply text only (endpoints without logprobs)")

  report = commands.add_parser("report", help="report.html, report.md and report.json")
  report.add_argument("--study", required=True)
  return parser


def _task_flags(parser) -> None:
  parser.add_argument("--study", required=True)
  parser.add_argument("--system", required=True, help="the system evaluated")
  parser.add_argument("--against", action="append", default=[],
                      help="an opponent (pairwise; repeatable); in the rating modes, further "
                      "systems to rate")
  parser.add_argument("--mode", choices=protocol.MODES, default="pairwise",
                      help="pairwise (section 3), absolute Fail/Pass/Excellent (section 4.3) "
                      "or helpfulness 1-6 (section 5)")


def _tasks(study: Study, args):
  from lima_jax.evaluate import assign  # pylint: disable=import-outside-toplevel
  study.check_systems([args.system], "--system")
  study.check_systems(args.against, "--against")
  if args.mode == "pairwise" and not args.against:
    raise LimaError("--against: pairwise needs at least one opponent")
  if args.system in args.against:
    raise LimaError(f"--against={args.system}: the system itself")
  return assign.tasks_for(args.mode, args.system, args.against)


def _new(args) -> None:
  # pylint: disable=import-outside-toplevel
  from lima_jax.data.conversations import parse_conversations, read_source
  from lima_jax.evaluate import answers, store
  if args.shared < 0:
    raise LimaError(f"--shared={args.shared}: must be 0 or more")
  raw = read_source(args.prompts, what="--prompts")
  items = store.prompt_items(parse_conversations(raw, args.prompts))
  study = Study.create(args.study, items, shared=args.shared, seed=args.seed)
  with open(os.path.join(args.study, answers.PROMPTS), "wb") as f:
    f.write(raw)
  print(f"new: study {args.study} of {len(items)} prompts, "
        f"{study.meta()['shared']} shared by every rater")


def _add(args) -> None:
  from lima_jax.evaluate import answers  # pylint: disable=import-outside-toplevel
  study = Study(args.study)
  if args.system in study.systems():
    raise LimaError(f"--system={args.system}: {args.study} already holds its answers")
  if args.answers is None:
    if args.samples < 1:
      raise LimaError(f"--samples={args.samples}: must be 1 or more")
    use_fake_cpu_devices(1)  # one process decoding: a fake CPU mesh would only slow it
    use_compile_cache(os.path.expanduser("~/.cache/lima_jax/jax"))
    source = argparse.Namespace(workdir=args.workdir, model=args.model, epoch=args.epoch,
                                step=None, chat_format=args.chat_format,
                                eot_token=args.eot_token, context=None)
    origin = args.model or (f"{args.workdir} epoch {args.epoch}" if args.epoch is not None
                            else args.workdir)
    files = answers.generate(args.study, source, name=args.system, samples=args.samples,
                             seed=args.seed, max_tokens=args.max_tokens)
  else:
    if args.epoch is not None or args.samples != 1:
      raise LimaError("--epoch and --samples go with --workdir or --model")
    files, origin = args.answers, ", ".join(args.answers)
  items = study.items()
  rows = answers.with_samples([answers.read_file(f, items) for f in files])
  study.add_answers(args.system, rows, origin)
  print(f"add: {len(rows)} answers of {args.system} to {len(items)} prompts")


def _annotate(args) -> None:
  import uvicorn  # pylint: disable=import-outside-toplevel
  from lima_jax.evaluate import page  # pylint: disable=import-outside-toplevel
  study = Study(args.study)
  app = page.make_app(study, _tasks(study, args))
  print(f"annotate: rating page at http://{args.host}:{args.port}/ ({args.mode}); "
        "Ctrl-C stops it", flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _import_votes(args) -> None:
  from lima_jax.evaluate import imports  # pylint: disable=import-outside-toplevel
  stored, repeated = imports.import_votes(Study(args.study), args.rater, args.file)
  print(f"import-votes: {stored} votes of {args.rater} stored"
        + (f", {repeated} already there" if repeated else ""))


def _judge(args) -> None:
  import tqdm  # pylint: disable=import-outside-toplevel
  from lima_jax.evaluate import judge  # pylint: disable=import-outside-toplevel
  study = Study(args.study)
  tasks = _tasks(study, args)
  settings = judge.Settings(
      endpoint=args.endpoint, model=args.model, api_key=os.environ.get(args.api_key_env),
      concurrency=args.concurrency, retries=args.retries, backoff_s=args.backoff,
      timeout_s=args.timeout, max_tokens=args.max_tokens, logprobs=not args.no_logprobs,
      top_logprobs=args.top_logprobs)
  client = judge.Judge(study, settings)
  todo, _ = client.todo(tasks)
  with tqdm.tqdm(total=len(todo), unit="request", desc="judge", dynamic_ncols=True) as bar:
    counts = asyncio.run(client.run(tasks, on_done=bar.update))
  print(f"judge: {client.name}: {counts['logprobs']} verdicts from logprobs, {counts['text']} "
        f"from text, {counts['failed']} failed, {counts['skipped']} judged before")
  if counts["failed"]:
    (reason, times), = client.failures.most_common(1)
    print(f"judge: {times} of the failures: {reason}; every request and reply is stored (table "
          "calls), and a rerun retries the failed ones")


def _report(args) -> None:
  from lima_jax.evaluate import report  # pylint: disable=import-outside-toplevel
  study = Study(args.study)
  data = report.write(study)
  for r in data["pairwise"]:
    print(f"report: {r['system']} vs {r['opponent']} ({r['rater']}, n={r['n']}): win "
          f"{r['win']:.0%} tie {r['tie']:.0%} loss {r['loss']:.0%}")
  print(f"report: {os.path.join(args.study, 'report.html')}, report.md and report.json")


_COMMANDS = {"new": _new, "add": _add, "annotate": _annotate, "import-votes": _import_votes,
             "judge": _judge, "report": _report}


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  quiet_logs()
  try:
    _COMMANDS[args.command](args)
  except LimaError as e:
    fail(str(e))


if __name__ == "__main__":
  main()
