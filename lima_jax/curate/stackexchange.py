"""Stack Exchange -> LIMA records, following the paper's selection (Zhou et al. 2023, sec. 2.1).

The dump folder holds one folder per site (`math.stackexchange.com/Posts.xml`, ...), as the
public data dump unpacks; a folder with a Posts.xml of its own is read as a single site.
Per site, the best-scoring questions whose title is a self-contained question form a pool
(`pool_per_site` of them), each with its top answer; answers that fail the filters are dropped.
Sites are grouped (STEM / Other, niche and meta sites left out) and, within a group, drawn with
temperature tau; each draw takes the drawn site's best remaining question. The prompt is the
title or the body, chosen per question by a seeded coin.
"""

import collections
import dataclasses
import os

from lima_jax.curate import filters, posts, sampling, sites
from lima_jax.curate.text import html_to_markdown
from lima_jax.errors import LimaError

SOURCE = "stackexchange"


@dataclasses.dataclass(frozen=True)
class Settings:
  per_group: int = 200
  tau: float = 3.0
  pool_per_site: int = 1000
  title_prob: float = 0.5  # chance that the prompt is the title rather than the body
  seed: int = 0
  rules: filters.AnswerRules = filters.AnswerRules()
  sites_file: str | None = None


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A question whose top answer passed; only what a record needs, as pools wait in memory."""
  site: str
  question_id: int
  title: str
  body: str  # HTML
  answer: str  # Markdown


def discover(dump: str) -> list[tuple[str, str]]:
  """(site name, Posts.xml path) of every site in the dump folder, sorted by name."""
  if not os.path.isdir(dump):
    raise LimaError(f"dump folder {dump} does not exist" if not os.path.exists(dump)
                    else f"{dump} is not a folder (expected the dump's folder of sites)")
  own = os.path.join(dump, "Posts.xml")
  if os.path.isfile(own):
    return [(sites.site_name(os.path.basename(os.path.abspath(dump))), own)]
  found = []
  for entry in sorted(os.listdir(dump)):
    path = os.path.join(dump, entry, "Posts.xml")
    if os.path.isfile(path):
      found.append((sites.site_name(entry), path))
  if not found:
    packed = any(name.endswith(".7z") for name in os.listdir(dump))
    hint = " (unpack the .7z archives first)" if packed else ""
    raise LimaError(f"{dump}: no site folders with a Posts.xml{hint}")
  return found


def candidates(scan: posts.SiteScan, site: str, rules: filters.AnswerRules,
               removed: collections.Counter) -> list[Candidate]:
  """The pool's questions whose top answer passes every filter, best question first."""
  kept = []
  for q in scan.pool:
    if q.answer_key is None:
      removed["no_answer"] += 1
      continue
    answer = html_to_markdown(q.answer_body)
    verdict = filters.answer_verdict(q.answer_score, answer, rules)
    if verdict:
      removed[verdict] += 1
    else:
      kept.append(Candidate(site, q.id, q.title, q.body, answer))
  return kept


def choose_prompt(c: Candidate, settings: Settings) -> tuple[str, str]:
  """(prompt, "title" or "body"): a coin fixed by the seed and the question, not the draw order."""
  coin = sampling.rng_for(settings.seed, "prompt", c.site, c.question_id).random()
  body = "" if coin < settings.title_prob else html_to_markdown(c.body)
  if not body:  # the title also stands in for a body with nothing left after cleaning
    return c.title.strip(), "title"
  return body, "body"


_WHY_SKIPPED = {"meta": "a meta site", sites.NICHE: "a niche site",
                "unclassified": "not in the site table (give its group in a --sites file)"}
_FUNNEL = ("title_not_self_contained", "unanswered", "outside_pool", "no_answer",
           *filters.ANSWER_FILTERS, "not_sampled")


def group_sites(dump: str, table: dict[str, str],
                progress) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
  """({group: {site: Posts.xml}} for STEM and Other, {reason: [site]} for the sites left out)."""
  by_group = {group: {} for group in sites.GROUPS}
  excluded = collections.defaultdict(list)
  for name, path in discover(dump):
    group = "meta" if sites.is_meta(name) else table.get(name, "unclassified")
    if group in by_group:
      by_group[group][name] = path
    else:
      excluded[group].append(name)
      progress(f"skipping {name}: {_WHY_SKIPPED[group]}")
  if not any(by_group.values()):
    names = ", ".join(sorted(n for group in excluded.values() for n in group))
    raise LimaError(f"{dump}: every site is niche, meta or not in the site table ({names}); "
                    "name their group in a --sites file")
  return by_group, {k: sorted(v) for k, v in sorted(excluded.items())}


def curate(dump: str, settings: Settings, progress=print) -> tuple[list[dict], dict]:
  """(records, summary) for the dump."""
  by_group, excluded = group_sites(dump, sites.table(settings.sites_file), progress)
  removed, prompts = collections.Counter(), collections.Counter()
  site_info, per_group, records = {}, {}, []
  for group, paths in by_group.items():
    pools, sizes = {}, {}
    for name, path in sorted(paths.items()):
      progress(f"reading {name} ({group}): {path}")
      scan = posts.scan(path, settings.pool_per_site)
      removed.update(scan.removed)
      pools[name] = candidates(scan, name, settings.rules, removed)
      sizes[name] = scan.questions
    probs = sampling.temperature_probabilities(sizes, settings.tau)
    drawn = sampling.draw(pools, probs, settings.per_group,
                          sampling.rng_for(settings.seed, "sites", group))
    removed["not_sampled"] += sum(len(p) for p in pools.values()) - len(drawn)
    per_group[group] = {"requested": settings.per_group, "selected": len(drawn),
                        "sites": len(sizes)}
    selected = collections.Counter(name for name, _ in drawn)
    for name in sizes:
      # The probability is the site's share before any site runs out of candidates.
      site_info[name] = {"group": group, "questions": sizes[name],
                         "probability": round(probs[name], 6),
                         "candidates": len(pools[name]), "selected": selected[name]}
    for _, c in drawn:
      prompt, kind = choose_prompt(c, settings)
      prompts[kind] += 1
      records.append({"conversations": [prompt, c.answer], "source": SOURCE})

  summary = {
      "settings": {**dataclasses.asdict(settings), "dump": dump},
      "removed": {name: removed.get(name, 0) for name in _FUNNEL},  # zeros listed too
      "per_group": per_group,
      "per_site": site_info,
      "excluded_sites": excluded,
      "prompts": dict(sorted(prompts.items())),
  }
  return records, summary
