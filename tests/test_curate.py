"""`python -m lima_jax.curate` on small dumps written here in the real Posts.xml schema.

Every filter gets a post that only it rejects, so removing the filter puts that post's marker
word into the output. Markers are plain words inside the answers.
"""

import collections
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from lima_jax.curate import cli, filters, merge, posts, sampling, stackexchange, text, wikihow
from lima_jax.errors import LimaError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SENTENCES = (
    "Bread goes stale because its starch slowly recrystallises as it cools and dries. ",
    "Wrapping the loaf in cloth keeps the crust crisp while the crumb stays soft. ",
    "A freezer stops the process almost completely, so sliced loaves keep for weeks. ",
    "The fridge is the worst place, since starch hardens fastest just above freezing. ",
    "Reheating a firm loaf briefly in a hot oven reverses much of the change. ",
)


def _prose(chars: int, marker: str, extra: str = "") -> str:
  """An answer body of about `chars` characters of neutral, assistant-like prose."""
  words, i = [marker + ".", extra], 0
  while sum(len(w) for w in words) < chars:
    words.append(_SENTENCES[i % len(_SENTENCES)])
    i += 1
  return "<p>" + "".join(words) + "</p>"


def _rich_answer(marker: str) -> str:
  return (_prose(1400, marker) + '<p>See <a href="https://example.com/x">the guide</a> at '
          'https://example.com/y. <img src="https://i.stack.imgur.com/a.png" alt="pic"></p>'
          "<pre><code>def stale(hours):\n    return hours &gt; 48\n</code></pre>"
          "<ul><li>Use a <b>bread box</b>.</li><li>Freeze slices.</li></ul>"
          "<ol><li>Wrap.</li><li>Freeze.</li></ol>")


class _Site:
  """Rows in Id order, as in the dump; answers follow their question."""

  def __init__(self):
    self.rows = []

  def question(self, title, answers, score=20, accepted=None):
    qid = len(self.rows) + 1
    row = {"Id": qid, "PostTypeId": 1, "CreationDate": "2015-03-01T10:00:00.000",
           "Score": score, "ViewCount": 1000, "Body": f"<p>Details about: {title}</p>",
           "OwnerUserId": 7, "Title": title, "Tags": "<baking><bread>",
           "AnswerCount": len(answers), "CommentCount": 0, "ContentLicense": "CC BY-SA 3.0"}
    self.rows.append(row)
    for i, (answer_score, html) in enumerate(answers):
      aid = len(self.rows) + 1
      if i == accepted:
        row["AcceptedAnswerId"] = aid
      self.rows.append({"Id": aid, "PostTypeId": 2, "ParentId": qid, "Score": answer_score,
                        "CreationDate": "2015-03-02T10:00:00.000", "Body": html,
                        "OwnerUserId": 9, "CommentCount": 0, "ContentLicense": "CC BY-SA 3.0"})

  def write(self, folder):
    os.makedirs(folder)
    root = ET.Element("posts")
    for row in self.rows:
      ET.SubElement(root, "row", {k: str(v) for k, v in row.items()})
    ET.indent(root)  # one row a line, as in the dump
    ET.ElementTree(root).write(os.path.join(folder, "Posts.xml"), encoding="utf-8",
                               xml_declaration=True)


def _good(site, n, tag):
  for i in range(n):
    site.question(f"How do you keep {tag} fresh for {i + 2} days?",
                  ((25, _prose(2000, f"GOOD{tag.upper()}{i}")),), score=30 + i)


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("dump"))
  cooking = _Site()
  _good(cooking, 6, "bread")
  cooking.question("Why does bread go stale so quickly?", ((25, _prose(900, "SHORT")),))
  cooking.question("Why does bread go stale in the fridge?", ((25, _prose(5000, "LONG")),))
  cooking.question("How should bread be stored overnight?",
                   answers=((25, _prose(2000, "FIRSTPERSON", "In my kitchen it works. ")),))
  cooking.question("How should sourdough be stored overnight?",
                   answers=((25, _prose(2000, "REFERS", "As mentioned in another answer, ")),))
  cooking.question("Can stale bread be revived in an oven?", ((9, _prose(2000, "LOW")),))
  cooking.question("Can stale bread be revived in a toaster?",
                   answers=((10, _prose(2000, "SCOREOK")),))
  cooking.question("What does this mean?", ((25, _prose(2000, "BADTITLE")),))
  cooking.question("Is rye bread healthier than wheat bread?", ())
  cooking.question("Which answer wins when both are good?", accepted=0,
                   answers=((12, _prose(2000, "ACCEPTEDLOWER")), (40, _prose(2000, "TOPANSWER"))))
  cooking.write(os.path.join(root, "cooking.stackexchange.com"))
  math = _Site()
  _good(math, 4, "proof")
  math.question("How can code and lists survive the cleaning?", ((30, _rich_answer("RICH")),))
  math.write(os.path.join(root, "math.stackexchange.com"))
  physics = _Site()
  _good(physics, 1, "atom")
  physics.write(os.path.join(root, "physics.stackexchange.com"))
  for folder, marker in (("ru.stackoverflow.com", "NICHE"),
                         ("cooking.meta.stackexchange.com", "META")):
    site = _Site()
    site.question("How is the site supposed to work well?", ((90, _prose(2000, marker)),))
    site.write(os.path.join(root, folder))
  return root


def _curate(*args) -> int:
  return cli.main([str(a) for a in args])


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def se_run(dump, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("se") / "se.jsonl")
  assert _curate("stackexchange", "--dump", dump, "--out", out, "--per-group", 50) == 0
  with open(out[:-6] + ".summary.json", encoding="utf-8") as f:
    summary = json.load(f)
  return _read(out), summary, out


def _answers(records):
  return "\n".join(r["conversations"][1] for r in records)


@pytest.mark.parametrize("marker,filter_name", [
    ("SHORT", "answer_too_short"), ("LONG", "answer_too_long"),
    ("FIRSTPERSON", "answer_first_person"), ("REFERS", "answer_refers_to_others"),
    ("LOW", "answer_score_below_min"), ("BADTITLE", "title_not_self_contained"),
])
def test_each_filter_removes_its_post(se_run, marker, filter_name):
  records, summary, _ = se_run
  assert marker + "." not in _answers(records)
  assert summary["removed"][filter_name] == 1


def test_good_posts_pass_and_boundaries_hold(se_run):
  records, summary, _ = se_run
  answers = _answers(records)
  for marker in ["SCOREOK", "RICH"] + [f"GOODBREAD{i}" for i in range(6)]:
    assert marker + "." in answers
  assert len(records) == 14 and summary["per_source"] == {"stackexchange": 14}
  assert summary["removed"]["unanswered"] == 1
  assert {r["source"] for r in records} == {"stackexchange"}


def test_top_answer_is_the_highest_scoring_one(se_run):
  answers = _answers(se_run[0])
  assert "TOPANSWER." in answers and "ACCEPTEDLOWER." not in answers


def test_niche_and_meta_sites_are_excluded(se_run):
  records, summary, _ = se_run
  assert "NICHE." not in _answers(records) and "META." not in _answers(records)
  assert summary["excluded_sites"] == {"meta": ["cooking.meta"], "niche": ["ru.stackoverflow"]}
  assert set(summary["per_site"]) == {"cooking", "math", "physics"}


def test_sites_file_overrides_the_table(dump, tmp_path):
  sites_file = tmp_path / "sites.txt"
  sites_file.write_text("# cooking is niche here\nniche: cooking\n")
  out = tmp_path / "o.jsonl"
  assert _curate("stackexchange", "--dump", dump, "--out", out, "--sites", sites_file) == 0
  assert "GOODBREAD0." not in _answers(_read(out))


def test_answer_length_boundaries():
  rules = filters.AnswerRules()
  assert filters.answer_verdict(10, "x" * 1199, rules) == "answer_too_short"
  assert filters.answer_verdict(10, "x" * 1200, rules) is None
  assert filters.answer_verdict(10, "x" * 4096, rules) is None
  assert filters.answer_verdict(10, "x" * 4097, rules) == "answer_too_long"
  assert filters.answer_verdict(9, "x" * 2000, rules) == "answer_score_below_min"


def test_wording_filters_skip_code_and_spare_non_personal_i():
  assert filters.first_person("The result surprised me.")
  assert filters.first_person("I would bake it longer.")
  assert not filters.first_person("Use `my_var` and I/O ports; a Type I error.\n```\nmy $x;\n```")
  assert filters.refers_to_others("As others have said, salt it.")
  assert filters.refers_to_others("This is covered on Stack Exchange.")
  assert not filters.refers_to_others("Deep recursion causes a stack overflow.")
  assert filters.title_self_contained("How do I bake bread at home?")
  assert not filters.title_self_contained("What does this code do?")
  assert not filters.title_self_contained("Sourdough starter")


def test_html_cleaning_keeps_code_and_lists(se_run):
  answer = next(r["conversations"][1] for r in se_run[0] if "RICH." in r["conversations"][1])
  assert "```\ndef stale(hours):\n    return hours > 48\n```" in answer
  assert "- Use a bread box.\n- Freeze slices." in answer
  assert "1. Wrap.\n2. Freeze." in answer
  assert "See the guide at." in answer
  for gone in ("http", "example.com", "<", "pic", "imgur"):
    assert gone not in answer


def test_html_to_markdown_nesting_and_fences():
  md = text.html_to_markdown("<ol start='3'><li>a<ul><li>b</li></ul></li></ol>"
                             "<pre>x = '```'</pre><p>tail</p>")
  assert md == "3. a\n   - b\n\n````\nx = '```'\n````\n\ntail"
  assert text.html_to_markdown("<ul><li>one<li>two</ul><p>after</p>") == "- one\n- two\n\nafter"


def test_temperature_probabilities():
  p = sampling.temperature_probabilities({"big": 1000, "small": 8, "empty": 0}, tau=3)
  assert p["big"] == pytest.approx(10 / 12) and p["small"] == pytest.approx(2 / 12)
  assert p["empty"] == 0
  p = sampling.temperature_probabilities({"a": 1000, "b": 8}, tau=1)
  assert p["a"] == pytest.approx(1000 / 1008)


def test_site_draws_follow_the_temperature_distribution():
  sizes = {"huge": 27000, "mid": 1000, "tiny": 27}
  probs = sampling.temperature_probabilities(sizes, tau=3)
  n = 6000
  drawn = sampling.draw({k: list(range(n)) for k in sizes}, probs, n, np.random.default_rng(0))
  counts = collections.Counter(name for name, _ in drawn)
  for name, p in probs.items():
    assert abs(counts[name] - n * p) < 4 * np.sqrt(n * p * (1 - p)), (name, counts, probs)


def test_run_weighs_sites_by_size_to_the_one_over_tau(se_run):
  per_site = se_run[1]["per_site"]
  sizes = {name: info["questions"] for name, info in per_site.items()}
  assert sizes == {"cooking": 15, "math": 5, "physics": 1}
  assert per_site["cooking"]["probability"] == 1.0  # alone in its group
  weight = 5 ** (1 / 3)  # math has 5 questions, physics 1
  assert per_site["math"]["probability"] == pytest.approx(weight / (weight + 1), abs=1e-6)


def test_exhausted_sites_drop_out_and_order_is_best_first():
  drawn = sampling.draw({"a": [1, 2], "b": [3, 4, 5]}, {"a": 1.0, "b": 1.0}, 10,
                        np.random.default_rng(1))
  assert sorted(x for _, x in drawn) == [1, 2, 3, 4, 5]
  assert [x for k, x in drawn if k == "b"] == [3, 4, 5]


def _candidate(i):
  return stackexchange.Candidate("site", i, f"Title {i}?", f"<p>Body {i}</p>", "answer")


def test_prompt_is_title_or_body_by_a_seeded_coin():
  cands = [_candidate(i) for i in range(600)]
  kinds = [stackexchange.choose_prompt(c, stackexchange.Settings(seed=5))[1] for c in cands]
  assert 0.43 < kinds.count("title") / len(kinds) < 0.57
  again = [stackexchange.choose_prompt(c, stackexchange.Settings(seed=5))[1] for c in cands]
  other = [stackexchange.choose_prompt(c, stackexchange.Settings(seed=6))[1] for c in cands]
  assert kinds == again and kinds != other
  prompt, kind = stackexchange.choose_prompt(cands[0], stackexchange.Settings(title_prob=0.0))
  assert (prompt, kind) == ("Body 0", "body")


def test_prompts_in_a_run_mix_titles_and_bodies(se_run):
  records, summary, _ = se_run
  assert summary["prompts"]["title"] > 0 and summary["prompts"]["body"] > 0
  prompts = [r["conversations"][0] for r in records]
  assert any(p.startswith("Details about:") for p in prompts)
  assert any(p.endswith("?") and not p.startswith("Details") for p in prompts)


def test_same_seed_same_bytes(dump, tmp_path):
  outs = []
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    out = tmp_path / f"{name}.jsonl"
    assert _curate("stackexchange", "--dump", dump, "--out", out, "--seed", seed) == 0
    outs.append(out.read_bytes())
  assert outs[0] == outs[1] and outs[0] != outs[2]


def test_summary_and_histogram_are_written(se_run):
  _, summary, out = se_run
  assert list(summary["removed"])[:3] == ["title_not_self_contained", "unanswered", "outside_pool"]
  svg = ET.parse(summary["histogram_file"]).getroot()
  assert summary["histogram_file"] == out[:-6] + ".lengths.svg"
  panels = [g for g in svg.iter("{http://www.w3.org/2000/svg}g")]
  assert [g.get("id") for g in panels] == ["prompt", "response"]
  bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") == "bar"]
  assert len(bars) == 40


def _article(title, category, intro="", sections=()):
  return {"title": title, "category": category, "intro": intro, "sections": list(sections)}


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def articles(tmp_path_factory):
  rows = [
      _article("How to Cook an Omelette", "Food and Entertaining",
               "This article shows how to cook a fluffy omelette.\n\nIt takes five minutes.",
               [{"heading": "Steps", "steps": [
                   'Crack <b>three eggs</b> into a bowl. <a href="https://www.wikihow.com/x">'
                   'Whisk them</a>.<img src="https://www.wikihow.com/e.jpg">',
                   "Pour the eggs into a hot, buttered pan."]},
                {"heading": "Serving", "text": "<p>Fold and serve.</p>"
                 "<p>This article was co-authored by a chef. CREDITMARKER</p>"},
                {"heading": "Tips", "steps": ["TIPSMARKER add cheese."]},
                {"heading": "Things You’ll Need", "steps": ["NEEDMARKER a pan"]},
                {"heading": "Warnings", "text": "WARNMARKER hot pans burn."}]),
      _article("How to Make Tea?", "Food and Entertaining", "Boil water and steep the leaves.")]
  rows += [_article(f"How to Paint Wall {i}", "Home and Garden",
                    f"This wikiHow teaches you to paint wall {i}.",
                    [{"heading": "Method", "steps": ["Sand.", "Prime.", "Paint."]}])
           for i in range(8)]
  rows.append(_article("How to Say Nothing", "Philosophy and Religion", "",
                       [{"heading": "Tips", "steps": ["Only a tip."]}]))
  return _write_jsonl(tmp_path_factory.mktemp("wh") / "articles.jsonl", rows)


@pytest.fixture(scope="module")
def wikihow_run(articles, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("whout") / "wh.jsonl")
  assert _curate("wikihow", "--articles", articles, "--out", out, "--n", 50) == 0
  with open(out[:-6] + ".summary.json", encoding="utf-8") as f:
    return _read(out), json.load(f)


def test_wikihow_rewrites_the_opening_and_prunes(wikihow_run):
  records, summary = wikihow_run
  omelette = next(r for r in records if r["conversations"][0] == "How to Cook an Omelette?")
  assert omelette["source"] == "wikihow"
  assert omelette["conversations"][1] == (
      "The following answer shows how to cook a fluffy omelette.\n\nIt takes five minutes.\n\n"
      "1. Crack three eggs into a bowl. Whisk them.\n2. Pour the eggs into a hot, buttered pan."
      "\n\nServing\n\nFold and serve.")
  for record in records:
    body = record["conversations"][1]
    assert not body.startswith(("This article", "This wikiHow"))
    for gone in ("TIPSMARKER", "NEEDMARKER", "WARNMARKER", "CREDITMARKER", "http", "<"):
      assert gone not in body
  assert any(r["conversations"][1].startswith("The following answer teaches") for r in records)
  assert "How to Make Tea?" in [r["conversations"][0] for r in records]


def test_wikihow_drops_articles_empty_after_pruning(wikihow_run):
  records, summary = wikihow_run
  assert len(records) == 10 and summary["removed"]["empty_after_pruning"] == 1
  assert "How to Say Nothing?" not in [r["conversations"][0] for r in records]
  assert summary["pruning"]["intros_rewritten"] == 9


def test_wikihow_samples_a_category_first(articles):
  # Food has 2 of the 10 usable articles, so drawing by article would pick it 1 time in 5. By
  # category it is 1 in 2: the third category's only article prunes to nothing, and the draw
  # is repeated between the other two.
  food = 0
  for seed in range(240):
    records, _ = wikihow.curate(articles, 1, seed)
    food += records[0]["conversations"][0] in ("How to Cook an Omelette?", "How to Make Tea?")
  assert abs(food - 120) < 4 * np.sqrt(240 * 0.5 * 0.5)


def test_merge_dedupes_by_normalised_prompt(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", [
      {"conversations": ["How do I keep bread fresh?", "Freeze it."], "source": "stackexchange"},
      {"conversations": ["What is rye?", "A grain."], "source": "stackexchange"}])
  b = _write_jsonl(tmp_path / "b.jsonl", [
      {"conversations": ["  how do i KEEP bread, fresh  ", "Bag it."], "source": "wikihow"},
      {"conversations": ["Write a haiku.", "Snow."]}])
  out = tmp_path / "train.jsonl"
  assert _curate("merge", a, b, "--out", out) == 0
  records = _read(out)
  assert [r["conversations"][1] for r in records] == ["Freeze it.", "A grain.", "Snow."]
  assert [r["source"] for r in records] == ["stackexchange", "stackexchange", "b"]
  summary = json.loads((tmp_path / "train.summary.json").read_text())
  assert summary["removed"] == {"duplicate_prompt": 1}
  assert summary["per_source"] == {"b": 1, "stackexchange": 2}
  assert merge.normalise_prompt("Ｈｏｗ  do I?") == merge.normalise_prompt("how do i")


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": _REPO}
  return subprocess.run([sys.executable, "-m", "lima_jax.curate", *map(str, args)], cwd=_REPO,
                        capture_output=True, text=True, env=env, timeout=120)


def _bad_inputs(tmp):
  """(arguments, what the message must contain) for each kind of bad input."""
  broken = os.path.join(tmp, "broken", "math.stackexchange.com")
  os.makedirs(broken)
  with open(os.path.join(broken, "Posts.xml"), "w") as f:
    f.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n  <row Id="1" PostTypeId="1"\n'
            '  <row Id="2" />\n</posts>\n')
  empty = _Site()
  empty.question("Why does bread go stale so quickly?", answers=((25, _prose(300, "TINY")),))
  empty.write(os.path.join(tmp, "empty", "cooking.stackexchange.com"))
  bad_json = _write_jsonl(os.path.join(tmp, "bad.jsonl"), [_article("How to X", "A"), "{oops"])
  out = os.path.join(tmp, "out.jsonl")
  return [
      (("stackexchange", "--dump", os.path.join(tmp, "broken"), "--out", out),
       os.path.join(broken, "Posts.xml") + ":4:"),
      (("stackexchange", "--dump", os.path.join(tmp, "nope"), "--out", out), "nope does not exist"),
      (("stackexchange", "--dump", os.path.join(tmp, "empty"), "--out", out),
       "no question passed the filters"),
      (("wikihow", "--articles", os.path.join(tmp, "missing.jsonl"), "--out", out),
       "missing.jsonl"),
      (("wikihow", "--articles", bad_json, "--out", out), "bad.jsonl:2: invalid JSON"),
      (("merge", os.path.join(tmp, "gone.jsonl"), "--out", out), "gone.jsonl"),
  ]


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
  for args, expected in _bad_inputs(str(tmp_path)):
    result = _cli(*args)
    assert result.returncode == 2, (args, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
  # An empty result still leaves the summary that explains it.
  assert (tmp_path / "out.summary.json").exists() and not (tmp_path / "out.jsonl").exists()


def test_a_file_that_is_not_posts_is_refused(tmp_path):
  path = tmp_path / "Users.xml"
  path.write_text('<?xml version="1.0"?>\n<users><row Id="1" /></users>\n')
  with pytest.raises(LimaError, match="Users.xml: not a Stack Exchange Posts.xml"):
    posts.scan(str(path), 10)


def test_merged_output_trains(se_run, wikihow_run, tmp_path):
  merged = tmp_path / "merged.jsonl"
  assert _curate("merge", se_run[2], wikihow_run[1]["output"], "--out", merged) == 0
  result = subprocess.run(
      [sys.executable, "-m", "lima_jax.train", f"--config.data.train_path={merged}",
       "--config.train.epochs=1", "--config.train.batch_size=8",
       "--config.optimizer.warmup_steps=0", f"--workdir={tmp_path / 'run'}"],  # a few steps
      cwd=_REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": _REPO})
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(tmp_path / "run")
