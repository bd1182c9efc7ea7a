"""LIMA's evaluation (Zhou et al. 2023, sections 3-5): a study directory holding prompts, every
system's answers and every vote and judge verdict (one SQLite file), the rating page for people,
an LLM judge over any OpenAI-compatible endpoint, and the report (`python -m lima_jax.evaluate`).

  store.py     the study directory and its SQLite database (WAL, one transaction per vote)
  protocol.py  the paper's questions: choices, rating scales, the judge's prompts
  answers.py   systems' answers from files (generate's output, AlpacaEval's) or generated now
  assign.py    which item a rater sees next, and on which side each answer goes
  page.py      the rating page (FastAPI)
  judge.py     the judge client (httpx): both orders, retries, every request and reply stored
  stats.py     win/tie/loss, tie-discounted agreement, bootstrap intervals
  plots.py     the report's SVG bar charts
  report.py    report.html, report.md, report.json
  cli.py       the command line
"""
