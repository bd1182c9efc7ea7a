"""`python -m lima_jax.curate`: see `lima_jax.curate.cli`."""

import sys

from lima_jax.curate.cli import main

sys.exit(main())
