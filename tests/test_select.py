"""Dev generations during training, the selection report, choosing an epoch, and the CLIs'
one-line errors, on a short toy run."""

import html.parser
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from lima_jax import config, generate, markdown, run_files, select, train
from lima_jax.decoding import Decoding
from lima_jax.prompts import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A toy run of 3 epochs x 3 steps that keeps one full checkpoint: the params of the other
  generation epochs survive only as exports."""
  path = str(tmp_path_factory.mktemp("run"))
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.data.max_length = 128
  cfg.train.batch_size, cfg.train.epochs = 32, EPOCHS
  cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_dim = 64, 2, 128
  cfg.checkpoint.max_to_keep = 1
  cfg.optimizer.warmup_steps = 2  # of 9 steps
  cfg.eval.max_new_tokens = 16
  train.run(cfg, path)
  return path


def cli(module, *args):
  proc = subprocess.run([sys.executable, "-m", f"lima_jax.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  return proc


def write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_every_epoch_keeps_its_generations_and_params(workdir):
  assert run_files.generated_epochs(workdir) == [1, 2, 3]
  per_epoch = [read_jsonl(run_files.generations_path(workdir, e)) for e in (1, 2, 3)]
  lines = [r["line"] for r in per_epoch[0]]
  assert lines and all([r["line"] for r in records] == lines for records in per_epoch)
  for record in per_epoch[-1]:
    assert {"prompt", "generation", "source", "tokens", "stopped"} <= set(record)
    assert record["tokens"] <= 16 and record["stopped"] in ("eot", "length")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(3 * EPOCHS)]
  kept = run_files.kept_epochs(workdir)
  assert sorted(kept) == [1, 2, 3] and {k.step for k in kept.values()} == {3, 6, 9}


class _Report(html.parser.HTMLParser):
  """The parts of report.html the test checks: cells per epoch, plots, series, text."""

  def __init__(self):
    super().__init__()
    self.cells, self.svgs, self.series, self.text = [], 0, [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if "data-epoch" in attrs:
      self.cells.append(int(attrs["data-epoch"]))
    self.svgs += tag == "svg"
    if tag == "polyline":
      self.series.append(attrs["data-name"])

  def handle_data(self, data):
    self.text.append(data)


def test_select_writes_a_report_of_every_epoch_with_plots(workdir):
  proc = cli("select", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr
  report = _Report()
  with open(os.path.join(workdir, "report.html"), encoding="utf-8") as f:
    page = f.read()
  report.feed(page)
  text = "".join(report.text)
  words = " ".join(text.split())  # HTML turns carriage returns into newlines
  generations = {e: read_jsonl(run_files.generations_path(workdir, e)) for e in (1, 2, 3)}
  prompts = len(generations[1])
  assert sorted(report.cells) == sorted([1, 2, 3] * prompts)  # side by side, per prompt
  for records in generations.values():
    for record in records:  # each answer shown as the one renderer renders it
      assert markdown.to_html(record["generation"]) in page
      assert " ".join(record["prompt"].split()) in words
  assert report.svgs == 3
  assert {"train loss (step)", "train loss (epoch mean)", "dev loss", "dev perplexity",
          "lr"} <= set(report.series)
  assert f"python -m lima_jax.select --workdir={workdir} --choose=E" in text
  with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
    twin = f.read()
  assert twin.count("**Epoch 3") == prompts and "![loss](report_loss.svg)" in twin
  assert os.path.isfile(os.path.join(workdir, "report_loss.svg"))


def test_choose_records_the_epoch_and_exports_it(workdir, capsys):
  out = os.path.join(workdir, "export", "epoch_2")
  select.main([f"--workdir={workdir}", "--choose=2"])
  assert "chose epoch 2" in capsys.readouterr().out
  with open(os.path.join(workdir, "chosen.json")) as f:
    chosen = json.load(f)
  assert chosen["epoch"] == 2 and chosen["step"] == 6 and chosen["export"] == "export/epoch_2"
  assert {"config.json", "tokenizer.model"} <= set(os.listdir(out))
  assert any(name.endswith(".safetensors") for name in os.listdir(out))
  with open(os.path.join(workdir, "report.html"), encoding="utf-8") as f:
    assert "Chosen: epoch 2" in f.read()


def test_chosen_json_paths_are_relative_to_the_workdir(workdir, tmp_path):
  """select run from the workdir's parent with a relative --workdir: chosen.json used to record
  the export relative to that cwd ("run0/export/epoch_1") beside a workdir-relative params path.
  Also: exporting reads each param's shape without Orbax's "Metadata file does not exist"."""
  parent, name = os.path.split(workdir)
  proc = subprocess.run([sys.executable, "-m", "lima_jax.select", f"--workdir={name}",
                         "--choose=1"], cwd=parent, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                            [ROOT, os.environ.get("PYTHONPATH", "")])))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Metadata file does not exist" not in proc.stderr, proc.stderr[-2000:]
  chosen = run_files.read_choice(workdir)
  assert chosen["export"] == os.path.join("export", "epoch_1")
  assert os.path.isfile(os.path.join(workdir, chosen["export"], "config.json"))
  assert os.path.isdir(os.path.join(workdir, chosen["params"], "state"))
  # An export outside the workdir is recorded as an absolute path.
  out = tmp_path / "orbax_export"
  proc = cli("select", f"--workdir={workdir}", "--choose=3", "--format=orbax", f"--out={out}")
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert run_files.read_choice(workdir)["export"] == str(out)
  assert os.path.isfile(out / "tokenizer.model") and os.path.isdir(out / "0" / "state")


def test_generate_help_explains_every_flag():
  """The description used to stop mid-sentence and every decoding flag's help read literally
  "default: the run's generate.{name}"."""
  proc = cli("generate", "--help")
  assert proc.returncode == 0, proc.stderr
  words = " ".join(proc.stdout.split())
  summary = " ".join(generate.__doc__.split("\n\n")[0].split())
  assert summary.endswith(".") and summary in words
  assert "{" not in proc.stdout
  for name in ("temperature", "top_p", "repetition_penalty", "max_tokens", "seed", "batch_size",
               "penalize_prompt"):
    assert f"Default: the run's generate.{name}" in words


def test_penalize_prompt_comes_from_the_run_or_the_flag():
  """Dev generations during training and `lima_jax.generate` read generate.penalize_prompt; a
  run saved before the key existed gets the paper's reading (False)."""
  parse = lambda *flags: generate._parser().parse_args(  # pylint: disable=protected-access
      ["--workdir=w", "--prompts=p", "--out=o", *flags])
  old_run = {"generate": {k: v for k, v in config.base_config().generate.items()
                          if k != "penalize_prompt"}}
  hf_run = {"generate": dict(config.base_config().generate.to_dict(), penalize_prompt=True)}
  decoded = lambda run_cfg, *flags: Decoding.from_config(
      generate.decoding_settings(run_cfg, parse(*flags))).penalize_prompt
  assert not decoded(old_run) and decoded(old_run, "--penalize_prompt")
  assert decoded(hf_run) and not decoded(hf_run, "--no-penalize_prompt")
  cfg = config.base_config()
  assert not Decoding.from_config(cfg.generate).penalize_prompt
  cfg.generate.penalize_prompt = True
  assert Decoding.from_config(cfg.generate).penalize_prompt


def test_generate_cli_answers_a_prompts_file(workdir, tmp_path):
  prompts = write(tmp_path / "prompts.jsonl", [
      json.dumps({"conversations": ["Say hello."], "source": "test"}),
      json.dumps({"conversations": ["Hi", "Hello!", "Name a colour."], "source": "multi"})])
  out = str(tmp_path / "answers.jsonl")
  proc = cli("generate", f"--workdir={workdir}", "--epoch=1", f"--prompts={prompts}",
             f"--out={out}", "--greedy", "--max_tokens=8")
  assert proc.returncode == 0, proc.stderr
  records = read_jsonl(out)
  assert [r["source"] for r in records] == ["test", "multi"]
  assert records[1]["history"] == ["Hi", "Hello!"] and records[1]["prompt"] == "Name a colour."
  assert all(r["tokens"] <= 8 for r in records)


def test_params_trained_with_a_tpu_kernel_generate_here(workdir):
  kept = run_files.locate(workdir, epoch=1)
  on_tpu = dataclasses.replace(kept, meta={**kept.meta,
                                           "model": {**kept.meta["model"], "attention": "splash"}})
  source, _ = generate.open_kept(on_tpu)
  trainer, params = generate.restore_kept(on_tpu, source)
  assert trainer.model(params).attention_kernel == "xla"  # this CPU's kernel


@pytest.mark.parametrize("case", ["empty", "malformed", "too_long", "surrogate", "no_params",
                                  "choose"])
def test_bad_input_is_a_one_line_error(workdir, tmp_path, case):
  good = json.dumps({"conversations": ["Say hello."]})
  files = {"empty": [], "malformed": [good, '{"conversations": ["unclosed"'],
           "too_long": [json.dumps({"conversations": ["word " * 400]})],
           # valid JSON (json.dumps escapes it as \ud83d) with no UTF-8 form
           "surrogate": [good, json.dumps({"conversations": ["Hi", "Hello!", "Smile \ud83d"]})]}
  prompts = write(tmp_path / "p.jsonl", files.get(case, [good]))
  expected = {"empty": f"{prompts}: no records", "malformed": f"{prompts}:2: invalid JSON",
              "too_long": f"{prompts}:1: the prompt is",
              "surrogate": f"{prompts}:2: conversations[2] holds a lone surrogate \\ud83d",
              "no_params": "--epoch=7", "choose": "--choose=7"}[case]
  if case == "choose":
    proc = cli("select", f"--workdir={workdir}", "--choose=7")
  else:
    proc = cli("generate", f"--workdir={workdir}", "--epoch=7" if case == "no_params" else
               "--epoch=3", f"--prompts={prompts}", f"--out={tmp_path / 'out.jsonl'}")
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_choose_orbax_export_carries_the_tokenizer(workdir, tmp_path):
  """--format=orbax: our params directory with the run's tokenizer files and EOT, usable as
  init_from and exportable to HF."""
  from lima_jax import convert  # pylint: disable=import-outside-toplevel
  from lima_jax.weights import pretrained  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "chosen")
  select.main([f"--workdir={workdir}", "--choose=2", "--format=orbax", f"--out={out}"])
  assert "tokenizer.model" in os.listdir(out)
  tok = pretrained.OrbaxParams(out).tokenizer()
  assert (tok.eot_id, tok.vocab_size) == (1000, 1001)
  assert convert.main(["orbax-to-hf", out, str(tmp_path / "hf")]) == 0


def test_epoch_zero_shows_the_starting_params(tmp_path):
  """eval.generate_epochs=(0, ...): before the first step the starting params get their dev
  loss and generations as epoch 0, kept for --choose=0, and the report shows them beside the
  trained epochs. Without the epoch-0 pass there is no epoch_0.jsonl and no epoch 0 row."""
  cfg = config.from_file(os.path.join(ROOT, "configs", "toy.py"))
  cfg.data.max_length = 128
  cfg.train.batch_size, cfg.train.epochs = 32, 1
  cfg.model.d_model, cfg.model.n_layers, cfg.model.ffn_dim = 64, 2, 128
  cfg.checkpoint.max_to_keep = 1
  cfg.eval.generate_epochs, cfg.eval.max_new_tokens = (0, 1), 8
  cfg.optimizer.warmup_steps = 0  # the run has 3 steps
  workdir = str(tmp_path / "run")
  train.run(cfg, workdir)
  assert run_files.generated_epochs(workdir) == [0, 1]
  assert sorted(run_files.kept_epochs(workdir)) == [0, 1]
  _, epochs = run_files.read_metrics(workdir)
  zero = [e for e in epochs if e["epoch"] == 0]
  assert len(zero) == 1 and zero[0]["step"] == 0 and "loss" not in zero[0]
  assert zero[0]["dev_loss"] > 6.0  # the random init: about ln(1001) = 6.9
  assert cli("select", f"--workdir={workdir}").returncode == 0
  with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
    report = f.read()
  assert "**Epoch 0 (before training)**" in report and "**Epoch 1**" in report


# The report as a reader sees it: one headless Chromium for the module's browser tests.
HOSTILE = ("**bold** and `code`\n\n<script>window.ran = 'script'</script>\n\n"
           "<img src=x onerror=\"window.ran = 'onerror'\">\n\n[click](javascript:window.ran=1)")


@pytest.fixture(scope="module")
def browser():
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
  options = webdriver.ChromeOptions()
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
    options.add_argument(arg)
  options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
  yield driver
  driver.quit()


def _open(driver, path):
  driver.get("file://" + path)
  driver.get_log("browser")  # console messages so far; those of this page come next
  driver.refresh()
  return [m for m in driver.get_log("browser") if m["level"] in ("SEVERE", "WARNING")]


def _copy_run(workdir, tmp_path, epochs_rows):
  """The module's run without its checkpoints, its epochs.jsonl replaced by epochs_rows."""
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints", "export*"))
  (copy / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs_rows))
  (copy / "chosen.json").unlink(missing_ok=True)
  return copy


def test_report_in_chromium_renders_markdown_and_runs_nothing(workdir, tmp_path, browser):
  """An answer's Markdown renders (bold, code), its HTML shows as text and runs nothing, the
  epoch table prints fixed decimals (2.000, not 2), and each plot's legend lies below the plot
  area, not over the dev-loss curve."""
  _, epochs = run_files.read_metrics(workdir)
  epochs = [dict(e, dev_loss=2.0, dev_perplexity=7.0) if e["epoch"] == 2 else e for e in epochs]
  run = _copy_run(workdir, tmp_path, epochs)
  path = run / "generations" / "epoch_2.jsonl"
  records = read_jsonl(str(path))
  records[0]["generation"] = HOSTILE
  write(path, [json.dumps(r) for r in records])
  assert cli("select", f"--workdir={run}").returncode == 0
  assert _open(browser, str(run / "report.html")) == []  # no console error or warning
  assert browser.execute_script("return window.ran === undefined")
  cell = browser.find_element("css selector", f'#line-{records[0]["line"]} [data-epoch="2"]')
  assert cell.find_element("css selector", ".answer strong").text == "bold"
  assert cell.find_element("css selector", ".answer code").text == "code"
  assert cell.find_elements("css selector", "script, img, a[href^='javascript']") == []
  assert "<script>window.ran = 'script'</script>" in cell.text and "<img src=x" in cell.text
  rows = {r[0]: r for r in (
      [td.text for td in tr.find_elements("tag name", "td")]
      for tr in browser.find_elements("css selector", "#epochs tr")) if r}
  assert rows["2"][3:5] == ["2.000", "7.00"]  # dev loss, dev perplexity
  assert rows["1"][2] == f'{epochs[0]["loss"]:.3f}'
  for figure in browser.find_elements("css selector", "figure"):
    frame = figure.find_elements("css selector", "rect.frame")
    if frame:  # a plot with data
      legend = figure.find_element("css selector", "g.legend")
      assert legend.rect["y"] >= frame[0].rect["y"] + frame[0].rect["height"], figure.text


def test_report_with_many_epochs_opens_on_a_few_and_the_picker_adds_more(workdir, tmp_path,
                                                                          browser):
  """45 generated epochs: each prompt used to be a row of 45 answers scrolled sideways, with the
  chosen epoch far out of view. The page opens on the chosen epoch, the lowest dev loss, the
  first and the last, wrapped to the window; the epoch picker shows any other epoch."""
  many, chosen, best = 45, 42, 30
  epochs = [{"epoch": e, "step": 3 * e, "loss": 3.0 - e / 100,
             "dev_loss": 2.0 + abs(e - best) / 100, "dev_perplexity": 8.0}
            for e in range(1, many + 1)]
  run = _copy_run(workdir, tmp_path, epochs)
  first = (run / "generations" / "epoch_1.jsonl").read_text()
  for e in range(4, many + 1):
    (run / "generations" / f"epoch_{e}.jsonl").write_text(first)
  run_files.write_choice(str(run), {"epoch": chosen, "step": 3 * chosen, "export": "x"})
  assert cli("select", f"--workdir={run}").returncode == 0
  assert _open(browser, str(run / "report.html")) == []
  width = browser.execute_script("return document.documentElement.clientWidth")
  assert browser.execute_script("return document.documentElement.scrollWidth") <= width
  line = read_jsonl(str(run / "generations" / "epoch_1.jsonl"))[0]["line"]
  visible = lambda: {int(c.get_attribute("data-epoch")): c for c in browser.find_elements(
      "css selector", f"#line-{line} .cell") if c.is_displayed()}
  cells = visible()
  assert sorted(cells) == [1, best, chosen, many]
  assert "chosen" in cells[chosen].get_attribute("class")
  box = cells[chosen].rect  # in the window, not scrolled out of view sideways
  assert 0 <= box["x"] and box["x"] + box["width"] <= width
  picker = browser.find_element("id", "epoch-picker")
  assert "42 (chosen)" in picker.text and "30 (lowest dev loss)" in picker.text
  browser.find_element("id", "show-7").click()
  assert sorted(visible()) == [1, 7, best, chosen, many]
  assert browser.execute_script("return document.documentElement.scrollWidth") <= width
