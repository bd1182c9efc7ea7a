"""Curating a LIMA training set the way the paper did (Zhou et al. 2023, sec. 2.1).

  python -m lima_jax.curate stackexchange --dump DUMP_DIR --out se.jsonl
  python -m lima_jax.curate wikihow --articles wikihow.jsonl --out wikihow.jsonl
  python -m lima_jax.curate merge se.jsonl wikihow.jsonl --out train.jsonl

Modules: `cli` (the commands), `stackexchange` (site groups, sampling, prompts) over `posts`
(streaming Posts.xml), `filters` (quality filters), `sites` (the site table), `wikihow`,
`merge`, `text` (HTML -> Markdown), `sampling` (temperature sampling), and the report every
run leaves: `summary`, `histogram`, `output`.
"""
