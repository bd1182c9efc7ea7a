"""`python -m lima_jax.evaluate`: see lima_jax/evaluate/cli.py."""

from lima_jax.evaluate.cli import main

main()
