"""The rating page: a local web app where people rate a study's answers (FastAPI).

  GET  /                 a rater enters their name
  GET  /rate?rater=NAME  the rater's next item: one prompt and two answers (system names hidden,
                         sides random per item and rater) or one answer to rate; the choices as
                         buttons and keys; progress
  POST /vote             one vote, stored in its own transaction before the next page is sent

Answers are untrusted text: they are rendered by `lima_jax.markdown.to_html` (Markdown, then an
allow-list sanitiser), and the page's Content-Security-Policy only runs the page's own script.
"""

import html
import secrets
import urllib.parse

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from lima_jax import markdown
from lima_jax.evaluate import assign, protocol
from lima_jax.evaluate.store import Study

_CSS = """
body{font-family:sans-serif;margin:24px auto;max-width:1200px;color:#222}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:16px}
.answer{border:1px solid #ccc;padding:8px 12px;background:#fafafa;overflow-wrap:anywhere}
.prompt{border-left:4px solid #888;padding:4px 12px;white-space:pre-wrap}
.history{color:#555;white-space:pre-wrap} .choices{margin:16px 0;display:flex;gap:8px;
flex-wrap:wrap} button{font-size:15px;padding:8px 14px} kbd{border:1px solid #999;
padding:0 4px;border-radius:3px} .meta{color:#666}
"""

# Keys press the button that carries them (data-key); nothing else runs in the page.
_KEYS = """
document.addEventListener('keydown', function (e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  var b = document.querySelector('button[data-key="' + e.key.toUpperCase() + '"]');
  if (b) { e.preventDefault(); b.click(); }
});
"""


def make_app(study: Study, tasks: list[assign.Task]) -> FastAPI:
  app = FastAPI(title="lima_jax rating page", docs_url=None, redoc_url=None, openapi_url=None)
  by_key = {t.key: t for t in tasks}

  @app.get("/", response_class=HTMLResponse)
  def start():
    return _page("Rate answers", (
        "<h1>Rate answers</h1><p>Enter your name; you can leave and come back later with the "
        "same name to continue where you stopped.</p>"
        '<form method="get" action="/rate"><input name="rater" id="rater" required '
        'maxlength="80" autofocus> <button type="submit" id="start">Start</button></form>'))

  @app.get("/rate", response_class=HTMLResponse)
  def rate(rater: str = ""):
    rater = rater.strip()
    if not rater or len(rater) > 80:
      return RedirectResponse("/", status_code=303)
    unit, done, total = assign.next_unit(study, rater, tasks)
    if unit is None:
      return _page("Done", f'<h1 id="done">Thank you, {_esc(rater)}: all {done} items are '
                           "rated.</h1>")
    return _page(f"Item {done + 1} of {total}", _item(study, rater, unit, done, total))

  @app.post("/vote")
  async def vote(request: Request):
    form = {k: v[0] for k, v in urllib.parse.parse_qs((await request.body()).decode()).items()}
    rater = form.get("rater", "").strip()
    task = by_key.get(form.get("task", ""))
    try:
      unit = assign.Unit(task, int(form["item"]), int(form["sample"]))
    except (KeyError, ValueError, TypeError):
      unit = None
    values = {c.value for c in protocol.CHOICES[task.mode]} if task else set()
    choice = form.get("choice")
    if (not rater or unit is None or task is None or choice not in values
        or (unit.item, unit.sample) not in assign.units(study, task)):
      return Response("bad vote", status_code=400)
    left = None
    if task.mode == "pairwise":
      left = assign.left_system(study, rater, unit)
      right = task.opponent if left == task.system else task.system
      choice = {"left": left, "right": right}.get(choice, protocol.TIE)
    with study.write() as db:
      study.add_vote(db, rater=rater, origin="page", mode=task.mode, item=unit.item,
                     sample=unit.sample, system=task.system, opponent=task.opponent, left=left,
                     choice=choice)
    return RedirectResponse(f"/rate?{urllib.parse.urlencode({'rater': rater})}",
                            status_code=303)

  return app


def _item(study: Study, rater: str, unit: assign.Unit, done: int, total: int) -> str:
  task = unit.task
  item = study.items()[unit.item]
  turns = item["turns"]
  history = "".join(f'<p class="history"><b>{"User" if i % 2 == 0 else "Assistant"}:</b> '
                    f"{_esc(t)}</p>" for i, t in enumerate(turns[:-1]))
  parts = [f'<p class="meta" id="progress">Item {done + 1} of {total} &middot; rater '
           f"{_esc(rater)}</p>",
           f"<p>{_esc(protocol.INSTRUCTIONS[task.mode])}</p>", history,
           f'<div class="prompt" id="prompt">{_esc(turns[-1])}</div>']
  if task.mode == "pairwise":
    left = assign.left_system(study, rater, unit)
    right = task.opponent if left == task.system else task.system
    texts = [study.answers(name)[(unit.item, 0)] for name in (left, right)]
    parts.append('<div class="pair">' + "".join(
        f'<div><h3>{side}</h3><div class="answer" id="answer-{name}">'
        f"{markdown.to_html(text)}</div></div>"
        for side, name, text in zip("AB", ("left", "right"), texts)) + "</div>")
  else:
    text = study.answers(task.system)[(unit.item, unit.sample)]
    parts.append(f'<h3>Response</h3><div class="answer" id="answer">{markdown.to_html(text)}'
                 "</div>")
  hidden = {"rater": rater, "task": task.key, "item": unit.item, "sample": unit.sample}
  parts.append('<form method="post" action="/vote">' + "".join(
      f'<input type="hidden" name="{k}" value="{_esc(v)}">' for k, v in hidden.items()) +
      '<div class="choices">' + "".join(
          f'<button type="submit" name="choice" value="{c.value}" id="choice-{c.value}" '
          f'data-key="{c.key}"><kbd>{c.key}</kbd> {_esc(c.label)}</button>'
          for c in protocol.CHOICES[task.mode]) + "</div></form>")
  return "\n".join(parts)


def _page(title: str, body: str) -> HTMLResponse:
  nonce = secrets.token_urlsafe(16)
  text = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}'
          f"</title><style>{_CSS}</style></head><body>{body}"
          f'<script nonce="{nonce}">{_KEYS}</script></body></html>')
  # Defence in depth behind the sanitiser: only this page's own script may run.
  policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "form-action 'self'; base-uri 'none'")
  return HTMLResponse(text, headers={"Content-Security-Policy": policy,
                                     "Cache-Control": "no-store"})


def _esc(text) -> str:
  return html.escape(str(text))
