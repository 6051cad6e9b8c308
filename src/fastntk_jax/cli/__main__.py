"""``python -m fastntk_jax.cli``."""

import sys

from fastntk_jax.cli.commands import main

sys.exit(main())
