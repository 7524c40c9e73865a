"""The ``protlm`` command (``python -m protlm_jax`` does the same).

The allocator environment comes first (:func:`protlm_jax.host_memory.reexec_tuned`:
on a CPU host the process restarts once under ``GLIBC_TUNABLES`` that keep
XLA:CPU's freed buffers for reuse), before the CLI's imports start threads or
take seconds; then :func:`protlm_jax.cli.main`.
"""

import sys

from protlm_jax import host_memory

host_memory.reexec_tuned()

from protlm_jax.cli import main  # noqa: E402  (after the restart, so nothing is imported twice)

if __name__ == "__main__":
    sys.exit(main())
