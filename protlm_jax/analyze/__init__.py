"""What the embeddings learned, shown: ``protlm analyze``.

* :mod:`~protlm_jax.analyze.aminoacids`: the 20 amino acids' input and mean
  contextual embeddings against their biophysics, beside a random init.
* :mod:`~protlm_jax.analyze.proteins`: per-protein maps and how well labels
  separate (k-NN, silhouette) against amino-acid composition.
* :mod:`~protlm_jax.analyze.stats`, :mod:`~protlm_jax.analyze.plots`,
  :mod:`~protlm_jax.analyze.properties`: the numbers, pictures and scales.
"""
