"""``python -m protlm_jax.cli``: the ``protlm`` command."""

import sys

from protlm_jax.cli import main

sys.exit(main())
