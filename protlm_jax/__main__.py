"""The ``protlm`` command (``python -m protlm_jax`` does the same).

For ``train`` and ``finetune`` the allocator environment comes first
(:func:`protlm_jax.host_memory.reexec_tuned`: on a CPU host the process
restarts once under ``GLIBC_TUNABLES`` that keep XLA:CPU's freed buffers for
reuse), before the CLI's imports start threads or take seconds; then
:func:`protlm_jax.cli.main`.
"""

import sys

from protlm_jax import host_memory

# Training steps repeat the same buffers, which the tuned heap keeps for reuse;
# commands with shapes that vary (embedding buckets) keep glibc's defaults
# plus the Embedder's own mallopt (a heap that never shrinks could grow there).
if sys.argv[1:2] in (["train"], ["finetune"]):
    host_memory.reexec_tuned()

from protlm_jax.cli import main  # noqa: E402  (after the restart, so nothing is imported twice)

if __name__ == "__main__":
    sys.exit(main())
