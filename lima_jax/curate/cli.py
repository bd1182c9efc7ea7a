"""The `python -m lima_jax.curate` command line: stackexchange, wikihow and merge."""

import argparse
import sys

from lima_jax.curate import filters, merge, output, stackexchange, summary, wikihow
from lima_jax.errors import LimaError

_DESCRIPTION = """\
Build a LIMA-style training set (Zhou et al. 2023, sec. 2.1) from Stack Exchange and wikiHow
dumps. Each command writes GAIR/lima JSONL records ({"conversations": [prompt, answer],
"source": ...}) to --out, plus OUT.summary.json (what each filter removed, per-source counts)
and OUT.lengths.svg (prompt and response length histograms)."""

_SE_HELP = """\
Reads the public Stack Exchange dump unpacked into DIR: one folder per site holding its
Posts.xml (e.g. DIR/math.stackexchange.com/Posts.xml). Sites are STEM, Other or niche by a
built-in table (override it with --sites FILE, lines `stem: site ...`, `other: ...`,
`niche: ...`; a site is its folder name without .stackexchange.com/.com/.net). Niche and meta
sites are left out."""

_WIKIHOW_HELP = """\
Reads wikiHow articles from a JSONL file, one article per line:
{"title": "How to ...", "category": "...", "intro": "...",
 "sections": [{"heading": "...", "steps": ["...", ...]} or {"heading": "...", "text": "..."}]}
Only title is required; text fields are HTML or plain text (blank lines between paragraphs).
A category is drawn uniformly, then an article within it."""


def _number(kind, low, high=None, low_allowed=True):
  """An argparse type: `kind` within [low, high] (or above low, if not low_allowed)."""
  def parse(text: str):
    value = kind(text)
    if value < low or (value == low and not low_allowed) or (high is not None and value > high):
      bounds = f"between {low} and {high}" if high is not None else (
          f"at least {low}" if low_allowed else f"above {low}")
      raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
    return value
  parse.__name__ = kind.__name__  # argparse names the type in "invalid int value: 'x'"
  return parse


def parser() -> argparse.ArgumentParser:
  top = argparse.ArgumentParser(prog="python -m lima_jax.curate", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
  rules, defaults = filters.AnswerRules(), stackexchange.Settings()
  count = _number(int, 1)

  se = commands.add_parser("stackexchange", help="select questions and answers from a dump",
                           description=_SE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
  se.add_argument("--dump", required=True, metavar="DIR", help="the unpacked dump's folder")
  se.add_argument("--per-group", type=count, default=defaults.per_group, metavar="N",
                  help="questions per group, STEM and Other (default %(default)s)")
  se.add_argument("--tau", type=_number(float, 0, low_allowed=False), default=defaults.tau,
                  help="site sampling temperature: P(site) ~ size^(1/tau) (default %(default)s)")
  se.add_argument("--pool-per-site", type=count, default=defaults.pool_per_site, metavar="N",
                  help="best-scoring questions per site that get their answer filtered "
                       "(default %(default)s)")
  se.add_argument("--min-score", type=int, default=rules.min_score, metavar="N",
                  help="the top answer's minimum score (default %(default)s)")
  se.add_argument("--min-chars", type=_number(int, 0), default=rules.min_chars, metavar="N",
                  help="shortest answer kept, in characters (default %(default)s)")
  se.add_argument("--max-chars", type=count, default=rules.max_chars, metavar="N",
                  help="longest answer kept, in characters (default %(default)s)")
  se.add_argument("--title-prob", type=_number(float, 0, 1), default=defaults.title_prob,
                  metavar="P",
                  help="chance that the prompt is the title, not the body (default %(default)s)")
  se.add_argument("--sites", metavar="FILE", help="site groups overriding the built-in table")

  wh = commands.add_parser("wikihow", help="sample wikiHow articles", description=_WIKIHOW_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
  wh.add_argument("--articles", required=True, metavar="FILE", help="the articles, JSONL")
  wh.add_argument("--n", type=count, default=200, help="articles to sample (default %(default)s)")

  mg = commands.add_parser("merge", help="merge curated files, deduplicating prompts",
                           description="Merge GAIR/lima JSONL files; the first record with a "
                           "given normalised prompt (case, punctuation, spacing ignored) wins.")
  mg.add_argument("inputs", nargs="+", metavar="FILE.jsonl")

  for command in (se, wh, mg):
    command.add_argument("--out", required=True, metavar="OUT.jsonl", help="the records")
  for command in (se, wh):
    command.add_argument("--seed", type=_number(int, 0), default=0, metavar="N",
                         help="fixes every random choice (default %(default)s)")
  return top


def _run(args) -> tuple[list[dict], dict, str]:
  """(records, command details, what to blame if nothing came out)."""
  if args.command == "stackexchange":
    if args.min_chars > args.max_chars:
      raise LimaError(f"--min-chars {args.min_chars} is above --max-chars {args.max_chars}")
    settings = stackexchange.Settings(
        per_group=args.per_group, tau=args.tau, pool_per_site=args.pool_per_site,
        title_prob=args.title_prob, seed=args.seed, sites_file=args.sites,
        rules=filters.AnswerRules(args.min_score, args.min_chars, args.max_chars))
    records, details = stackexchange.curate(args.dump, settings)
    return records, details, f"{args.dump}: no question passed the filters"
  if args.command == "wikihow":
    records, details = wikihow.curate(args.articles, args.n, args.seed)
    return records, details, f"{args.articles}: no article is left after pruning"
  records, details = merge.curate(args.inputs)
  return records, details, "no records in the inputs"


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    records, details, why_empty = _run(args)
    report = summary.complete(args.command, details, records, args.out)
    # Written even when empty: it is what explains an empty result.
    summary.write(report, records)
    if not records:
      raise LimaError(f"{why_empty} (see {report['summary_file']})")
    output.write_records(args.out, records)
    print(summary.describe(report))
  except LimaError as e:
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2
  return 0
