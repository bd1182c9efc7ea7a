"""The rating page and the report page in a real browser (headless Chromium via selenium), the
page served by `python -m lima_jax.evaluate annotate` in a subprocess."""

import json
import os
import signal

import pytest

from lima_jax.evaluate.store import Study
from tests.evaluate_helpers import (database, evaluate, free_port, make_study, start_module,
                                        stop)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=wrong-import-position
from selenium.webdriver.common.by import By  # pylint: disable=wrong-import-position
from selenium.webdriver.support import expected_conditions  # pylint: disable=wrong-import-position
from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=wrong-import-position

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPTS = [f"Question number {i}: how do I do thing {i}?" for i in range(5)]
# Every base answer tries to run code; every lima answer is Markdown that must render.
HOSTILE = ('<script>window.__pwned = 1</script> <img src=x onerror="window.__pwned = 2"> '
           '[x](javascript:window.__pwned=3)')
SYSTEMS = {"lima": [f"LIMA answer {i} with **bold** text" for i in range(5)],
           "base": [f"Base answer {i} {HOSTILE}" for i in range(5)]}


@pytest.fixture(scope="module")
def browser():
  if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    pytest.skip(f"needs {CHROMIUM} and {DRIVER} (apt-get install chromium chromium-driver)")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(flag)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  return make_study(str(tmp_path_factory.mktemp("page")), PROMPTS, SYSTEMS, shared=2)


class Page:
  """The annotate server (restartable) and the browser on it."""

  def __init__(self, browser, study, *flags):
    self.browser, self.study, self.flags = browser, study, flags
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None

  def start(self):
    self.proc = start_module("lima_jax.evaluate", "annotate", f"--study={self.study}",
                             f"--port={self.port}", *self.flags, url=self.url + "/")

  def kill(self):
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()

  def open_as(self, rater):
    self.browser.get(self.url + "/")
    self.browser.find_element(By.ID, "rater").send_keys(rater)
    _act(self, self.browser.find_element(By.ID, "start").click)

  def text(self, element_id):
    return self.browser.find_element(By.ID, element_id).text

  def errors(self):
    return [e for e in self.browser.get_log("browser") if e["level"] == "SEVERE"]


def _stored(study, mode):
  with database(study) as db:
    return db.execute("SELECT rater, item, system, opponent, left_system, choice FROM votes "
                      "WHERE mode = ? ORDER BY id", (mode,)).fetchall()


def _item(page):
  return PROMPTS.index(page.text("prompt"))


def _act(page, action):
  """Runs `action` (a click or a key) and waits for the next page."""
  old = page.browser.find_element(By.TAG_NAME, "html")
  action()
  WebDriverWait(page.browser, 30).until(expected_conditions.staleness_of(old))
  WebDriverWait(page.browser, 30).until(
      lambda b: b.execute_script("return document.readyState") == "complete")


def _press(page, key):
  """A key press as a person makes it: to the page, not to an element found beforehand (which
  a loading page may have replaced already)."""
  _act(page, lambda: ActionChains(page.browser).send_keys(key).perform())


def _rate_pair(page, how, done):
  """Picks the winner `how` ('lima', 'base' or 'tie') on the shown item, by key or button
  (alternating), after checking the answers: untrusted HTML shown as text, nothing run."""
  item = _item(page)
  left, right = page.text("answer-left"), page.text("answer-right")
  shown_left = "lima" if left.startswith("LIMA") else "base"
  lima, base = (left, right) if shown_left == "lima" else (right, left)
  assert lima == f"LIMA answer {item} with bold text"
  assert base.startswith(f"Base answer {item} <script>window.__pwned = 1</script> <img src=x ")
  for side in ("answer-left", "answer-right"):
    answer = page.browser.find_element(By.ID, side)
    assert not answer.find_elements(By.TAG_NAME, "img")
    assert not answer.find_elements(By.TAG_NAME, "script")
    assert all(not (a.get_attribute("href") or "").startswith("javascript")
               for a in answer.find_elements(By.TAG_NAME, "a"))
  lima_side = "answer-left" if shown_left == "lima" else "answer-right"
  strong = page.browser.find_element(By.ID, lima_side).find_element(By.TAG_NAME, "strong")
  assert strong.text == "bold"
  assert page.browser.execute_script("return window.__pwned") is None
  choice = "tie" if how == "tie" else ("left" if how == shown_left else "right")
  if len(done) % 2:
    key = {"left": "a", "right": "b", "tie": "n"}[choice]
    _press(page, key)
  else:
    _act(page, page.browser.find_element(By.ID, f"choice-{choice}").click)
  done.append((item, shown_left, how))


def test_two_raters_rate_through_a_kill(browser, study):
  page = Page(browser, study, "--system=lima", "--against=base")
  page.start()
  try:
    plan = {"ann": ["lima", "tie", "base"], "bob": ["base", "tie", "lima", "tie"]}
    done = {"ann": [], "bob": []}
    page.open_as("ann")
    for how in plan["ann"][:2]:  # the two shared items
      _rate_pair(page, how, done["ann"])
    shown = _item(page)  # ann's next item, claimed when shown
    assert page.text("progress").startswith("Item 3 of ")
    page.kill()  # between clicks: nothing stored may be lost
    assert len(_stored(study, "pairwise")) == 2
    page.start()
    page.browser.get(page.url + "/rate?rater=ann")
    assert _item(page) == shown and page.text("progress").startswith("Item 3 of ")
    page.open_as("bob")
    for how in plan["bob"]:
      _rate_pair(page, how, done["bob"])
    assert "all 4 items are rated" in page.text("done")
    page.browser.get(page.url + "/rate?rater=ann")
    for how in plan["ann"][2:]:
      _rate_pair(page, how, done["ann"])
    assert "all 3 items are rated" in page.text("done")
    assert not page.errors()  # the page's own key script ran under its CSP, nothing else
  finally:
    stop(page.proc)
  stored = _stored(study, "pairwise")
  clicked = [(rater, item, "lima", "base", left, how)
             for rater in ("ann", "bob") for item, left, how in done[rater]]
  assert sorted(stored) == sorted(clicked)
  # Shared items went to both, the other three were split between them.
  shared = {i for i, *_ in done["ann"]} & {i for i, *_ in done["bob"]}
  assert len(shared) == 2 and {i for _, i, *_ in stored} == set(range(5))
  # Sides were drawn per rater and item: lima was shown on both sides.
  assert {left for *_, left, _ in stored} == {"lima", "base"}


@pytest.mark.parametrize("mode, keys", [("absolute", ["e", "f", "p"]),
                                        ("helpfulness", ["6", "2", "4"])])
def test_rating_modes(browser, study, mode, keys):
  page = Page(browser, study, "--system=lima", f"--mode={mode}")
  page.start()
  try:
    page.open_as("cy")
    rated = []
    for key in keys:
      rated.append(_item(page))
      assert page.text("answer").startswith("LIMA answer")
      _press(page, key)
    assert not page.errors()
  finally:
    stop(page.proc)
  names = {"e": "excellent", "f": "fail", "p": "pass"}
  assert _stored(study, mode) == [("cy", i, "lima", "", None, names.get(k, k))
                                  for i, k in zip(rated, keys)]


def test_report_page(browser, tmp_path):
  """The report of a study whose votes came as a crowd platform's file (import-votes) and as
  the rating page stores them: its own study, so it needs no other test's votes."""
  study = make_study(str(tmp_path), PROMPTS, SYSTEMS, shared=2)
  rows = {"ann": ["lima", "lima", "tie", "base", "lima"], "bob": ["lima", "tie", "tie", "base", "base"]}
  for rater, winners in rows.items():
    path = tmp_path / f"{rater}.jsonl"
    path.write_text("".join(json.dumps({"item": i, "a": "lima", "b": "base", "winner": w}) + "\n"
                            for i, w in enumerate(winners)))
    evaluate("import-votes", f"--study={study}", f"--rater={rater}", f"--file={path}")
  store = Study(study)
  with store.write() as db:
    for item, (rating, score) in enumerate([("excellent", "5"), ("pass", "4"), ("fail", "2")]):
      for mode, choice in (("absolute", rating), ("helpfulness", score)):
        store.add_vote(db, rater="cy", origin="page", mode=mode, item=item, sample=0,
                       system="lima", opponent="", left=None, choice=choice)
  evaluate("report", f"--study={study}")
  with open(os.path.join(study, "report.json"), encoding="utf-8") as f:
    data = json.load(f)
  browser.get_log("browser")  # drop earlier pages' entries
  browser.get("file://" + os.path.join(study, "report.html"))
  assert browser.title.startswith("LIMA evaluation")
  assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
  bars = browser.find_elements(By.CSS_SELECTOR, "#plot-pairwise rect.bar")
  assert {b.get_attribute("data-segment") for b in bars} == {"win", "tie", "loss"}
  assert browser.find_elements(By.CSS_SELECTOR, "#plot-absolute rect.bar")
  assert browser.find_elements(By.CSS_SELECTOR, "#plot-helpfulness rect.bar")
  assert browser.find_elements(By.CSS_SELECTOR, "#plot-pairwise path.ci")
  (people,) = data["pairwise"]
  assert (people["rater"], people["n"]) == ("people", 10)
  assert [r["raters"] for r in data["agreement"]] == [["ann", "bob"]]
  rows = browser.find_elements(By.CSS_SELECTOR, "#table-agreement tr")
  assert "ann / bob" in rows[1].text
