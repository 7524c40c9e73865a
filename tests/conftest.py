"""Test set-up: 8 simulated CPU devices, quiet TF, and real-data fixtures.

The environment is fixed here, before any test imports jax or tensorflow, so
sharding is exercised on a real 8-device mesh.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gzip  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

# The library registers no seqio tasks itself (the entry points import
# protlm_tasks); tests that read the pipeline need them registered.
import protlm_tasks  # noqa: E402,F401

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"
UNIPROT20K = REPO / "data" / "fetched" / "uniprot20k" / "DB.fasta.gz"


def read_sample_records(path=SAMPLE, limit=None):
    """(id, sequence) pairs of a FASTA(.gz) file, parsed independently of the
    project's reader so that tests do not check the reader against itself."""
    opener = gzip.open if str(path).endswith(".gz") else open
    records, ident, parts = [], None, []
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if ident is not None:
                    records.append((ident, "".join(parts)))
                    if limit and len(records) >= limit:
                        return records
                ident, parts = line[1:].split()[0], []
            elif line:
                parts.append(line)
    if ident is not None:
        records.append((ident, "".join(parts)))
    return records


def two_steps(run, batches, with_carry=False):
    """Initialises ``run`` (a Trainer) and takes one step per batch: (params,
    losses), or ((params, carry), losses) with ``with_carry`` (recurrent objectives)."""
    import jax

    state = run.init_state()
    fn = run.train_fn(state)
    losses = []
    for b in batches:
        state, m = fn(state, run._global(b))
        losses.append(float(m["loss"]) / float(m["weight"]))
    return jax.device_get((state.params, state.carry) if with_carry else state.params), losses


@pytest.fixture(scope="session")
def sample_path():
    return SAMPLE


@pytest.fixture(scope="session")
def sample_records():
    return read_sample_records()


@pytest.fixture(scope="session")
def uniprot20k_path():
    if not UNIPROT20K.exists():
        pytest.skip("full UniProt set not fetched: run `make data` "
                    "(`make test` does it first)")
    return UNIPROT20K


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory):
    """The bundled sample prepared as the ``uniprot_sample`` corpus.

    Returns the data dir; ``PROTLM_DATA_DIR`` points there for the session.
    """
    from protlm_jax.data import prepare

    root = tmp_path_factory.mktemp("prepared")
    stats = prepare.run(prepare.PrepareConfig(
        inputs=(str(SAMPLE),), output=str(root / "uniprot_sample"), num_shards=4,
        validation_fraction=0.05, progress=False))
    # The data root of the session from here on: the fetched sets stay where
    # `make data` put them.
    fetched = REPO / "data" / "fetched"
    if fetched.is_dir():
        (root / "fetched").symlink_to(fetched, target_is_directory=True)
    os.environ["PROTLM_DATA_DIR"] = str(root)
    return root, stats


def random_params(family_name, preset, seed=0, noise=0.05):
    """(config, params) of a family preset: its own initialisation plus seeded
    Gaussian noise (so no weight is a constant, LayerNorm scales included)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from protlm_jax import models

    fam = models.lookup(family_name)
    cfg = fam.presets[preset]
    module, feats = fam.build(cfg)
    x = jnp.ones((2, 8), jnp.int32)
    params = nn.meta.unbox(module.init(jax.random.PRNGKey(seed), *[x] * len(feats))["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return cfg, jax.tree.unflatten(tree, [v + noise * jax.random.normal(k, v.shape)
                                          for v, k in zip(leaves, keys)])


def random_model_dir(path, family_name, preset, seed=0):
    """A training MODEL_DIR (one checkpoint at step 3) of :func:`random_params`."""
    import dataclasses

    import jax.numpy as jnp

    from protlm_jax.checkpoints import Checkpointer

    cfg, params = random_params(family_name, preset, seed)
    ckpt = Checkpointer(str(path), async_save=False)
    ckpt.save(3, {"step": jnp.asarray(3, jnp.int32), "params": params},
              {"model_config": dataclasses.asdict(cfg), "model_family": family_name,
               "step": 3})
    ckpt.close()
    return str(path)
