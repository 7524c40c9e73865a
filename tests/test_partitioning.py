"""Tests for protlm_jax.partitioning on 8 simulated CPU devices.

The core property: a step jitted with sharded params and batch on a 2x4
(data, model) mesh computes the same loss and gradients as on one device.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from protlm_jax import partitioning

VOCAB, EMBED, MLP = 16, 8, 32
BATCH, LENGTH = 4, 6


class TinyLM(nn.Module):
    """Embedding -> MLP block -> tied logits, with logical axes everywhere."""

    @nn.compact
    def __call__(self, tokens):
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                         ("vocab", "embed")),
            (VOCAB, EMBED))
        x = jnp.take(embedding, tokens, axis=0)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = nn.Dense(
            MLP, name="wi",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.1), ("mlp",)))(x)
        h = nn.with_logical_constraint(nn.relu(h), ("batch", "length", "mlp"))
        # A plain (unboxed) bias: must come out replicated.
        y = nn.Dense(
            EMBED, name="wo",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=nn.initializers.normal(0.1))(h)
        y = nn.with_logical_constraint(x + y, ("batch", "length", "embed"))
        return y @ embedding.T


def loss_fn(params, batch):
    logits = TinyLM().apply({"params": params}, batch["inputs"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)
    return nll.mean()


def step(params, batch):
    return jax.value_and_grad(loss_fn)(params, batch)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32),
            "targets": rng.integers(0, VOCAB, (BATCH, LENGTH), dtype=np.int32)}


RULES_1D = partitioning.standard_logical_axis_rules("1d")
RULES_2D = partitioning.standard_logical_axis_rules("2d")


@pytest.fixture(scope="module")
def mesh_2x4():
    return partitioning.create_mesh(model_parallel_size=4)


def init_sharded(mesh, rules):
    tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
    return partitioning.sharded_init(TinyLM().init, mesh, rules,
                                     jax.random.key(0), tokens)


# ------------------------------------------------------------------- mesh ---

def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mp,shape", [(1, (8, 1)), (2, (4, 2)), (4, (2, 4)),
                                      (8, (1, 8))])
def test_create_mesh_shapes(mp, shape):
    mesh = partitioning.create_mesh(mp)
    assert mesh.axis_names == ("data", "model")
    assert tuple(mesh.devices.shape) == shape
    assert set(mesh.devices.flat) == set(jax.devices())


def test_create_mesh_one_device():
    mesh = partitioning.create_mesh(1, devices=jax.devices()[:1])
    assert tuple(mesh.devices.shape) == (1, 1)


@pytest.mark.parametrize("mp", [3, 0, 16])
def test_create_mesh_not_divisible(mp):
    with pytest.raises(partitioning.PartitioningError, match="divisor"):
        partitioning.create_mesh(mp)


# ------------------------------------------------------------------ rules ---

EXPECTED_1D = {"batch": "data", "vocab": "model", "mlp": "model",
               "heads": "model", "joined_kv": "model", "embed": None,
               "kv": None, "length": None, "layers": None,
               "relpos_buckets": None, "lora_rank": None}


@pytest.mark.parametrize("rule_set", ["1d", "2d"])
def test_every_logical_name_resolves(rule_set):
    rules = partitioning.standard_logical_axis_rules(rule_set)
    assert {name for name, _ in rules} == set(partitioning.LOGICAL_AXES)
    expected = dict(EXPECTED_1D, embed="data" if rule_set == "2d" else None)
    for name in partitioning.LOGICAL_AXES:
        spec = partitioning.logical_to_mesh_axes(P(name), rules)
        assert spec == P(expected[name]), name


@pytest.mark.parametrize("rules,logical,mesh_spec", [
    (RULES_1D, ("batch", "length", "embed"), P("data", None, None)),
    (RULES_1D, ("batch", "length", "mlp"), P("data", None, "model")),
    (RULES_1D, ("vocab", "embed"), P("model", None)),
    (RULES_1D, ("embed", "mlp"), P(None, "model")),
    (RULES_1D, ("embed", "heads", "kv"), P(None, "model", None)),
    # 2-D: activations keep batch on "data" and embed replicated ...
    (RULES_2D, ("batch", "length", "embed"), P("data", None, None)),
    (RULES_2D, ("batch", "length", "heads", "kv"),
     P("data", None, "model", None)),
    # ... while parameters put embed on "data": split over both axes.
    (RULES_2D, ("vocab", "embed"), P("model", "data")),
    (RULES_2D, ("embed", "mlp"), P("data", "model")),
    (RULES_2D, ("mlp", "embed"), P("model", "data")),
    (RULES_2D, ("relpos_buckets", "heads"), P(None, "model")),
])
def test_rule_resolution(rules, logical, mesh_spec):
    assert partitioning.logical_to_mesh_axes(P(*logical), rules) == mesh_spec


def test_unknown_rule_set():
    with pytest.raises(partitioning.PartitioningError, match="3d"):
        partitioning.standard_logical_axis_rules("3d")


def test_unknown_logical_name_raises(mesh_2x4):
    with pytest.raises(partitioning.PartitioningError, match="decode_length"):
        partitioning.logical_to_mesh_axes(P("batch", "decode_length"),
                                          RULES_1D)
    tree = {"cache": {"k": P("batch", "decode_length", "heads")}}
    with pytest.raises(partitioning.PartitioningError,
                       match=r"decode_length.*\['cache'\]\['k'\]"):
        partitioning.logical_to_sharding(tree, mesh_2x4, RULES_1D)


def test_logical_to_sharding_none_is_replicated(mesh_2x4):
    out = partitioning.logical_to_sharding(
        {"a": None, "b": P("batch", "embed")}, mesh_2x4, RULES_1D)
    assert out["a"] == NamedSharding(mesh_2x4, P())
    assert out["b"] == NamedSharding(mesh_2x4, P("data", None))


def test_indivisible_param_names_it(mesh_2x4):
    abstract = {"params": {"emb": nn.LogicallyPartitioned(
        jax.ShapeDtypeStruct((33, 8), jnp.float32), ("vocab", "embed"))}}
    with pytest.raises(partitioning.PartitioningError,
                       match=r"\['params'\]\['emb'\].*33"):
        partitioning.param_shardings(abstract, mesh_2x4, RULES_1D)


# ------------------------------------------------------------ sharded init ---

def test_param_shardings_from_eval_shape(mesh_2x4):
    boxed = jax.eval_shape(TinyLM().init, jax.random.key(0),
                           jnp.zeros((BATCH, LENGTH), jnp.int32))
    shardings, abstract = partitioning.param_shardings(boxed, mesh_2x4,
                                                       RULES_1D)
    assert isinstance(abstract["params"]["embedding"], jax.ShapeDtypeStruct)
    assert abstract["params"]["wi"]["kernel"].shape == (EMBED, MLP)
    assert shardings["params"]["wi"]["kernel"].spec == P(None, "model")
    assert shardings["params"]["wo"]["bias"].spec == P()


@pytest.mark.parametrize("rules,expected", [
    (RULES_1D, {("embedding",): P("model", None),
                ("wi", "kernel"): P(None, "model"),
                ("wi", "bias"): P("model"),
                ("wo", "kernel"): P("model", None),
                ("wo", "bias"): P()}),
    (RULES_2D, {("embedding",): P("model", "data"),
                ("wi", "kernel"): P("data", "model"),
                ("wi", "bias"): P("model"),
                ("wo", "kernel"): P("model", "data"),
                ("wo", "bias"): P()}),
])
def test_sharded_init(mesh_2x4, rules, expected):
    variables, shardings = init_sharded(mesh_2x4, rules)
    reference = nn.unbox(TinyLM().init(jax.random.key(0),
                                       jnp.zeros((BATCH, LENGTH), jnp.int32)))
    params = variables["params"]
    for path, spec in expected.items():
        leaf, ref, sharding = params, reference["params"], shardings["params"]
        for k in path:
            leaf, ref, sharding = leaf[k], ref[k], sharding[k]
        assert isinstance(leaf, jax.Array)
        assert leaf.sharding.spec == spec, path
        assert sharding.spec == spec, path
        assert leaf.sharding.mesh.shape == mesh_2x4.shape
        expected_shard = tuple(
            d // (1 if a is None else mesh_2x4.shape[a])
            for d, a in zip(leaf.shape, tuple(spec) + (None,) * leaf.ndim))
        assert leaf.addressable_shards[0].data.shape == expected_shard, path
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref),
                                   rtol=1e-6, atol=1e-6)
    # The mlp axis is split 4 ways over "model" under both rule sets.
    assert params["wi"]["kernel"].addressable_shards[0].data.shape[1] == (
        MLP // 4)


# ------------------------------------------------------------ sharded step ---

def run_step(mesh, rules):
    variables, shardings = init_sharded(mesh, rules)
    batch = partitioning.host_local_to_global(make_batch(), mesh)
    replicated = NamedSharding(mesh, P())
    fn = partitioning.partitioned_jit(
        step, mesh, rules,
        in_shardings=(shardings["params"], partitioning.batch_sharding(mesh)),
        out_shardings=(replicated, shardings["params"]))
    loss, grads = fn(variables["params"], batch)
    return fn, (variables["params"], batch), loss, grads


@pytest.mark.parametrize("rules", [RULES_1D, RULES_2D], ids=["1d", "2d"])
def test_sharded_step_equals_one_device(mesh_2x4, rules):
    one = partitioning.create_mesh(1, devices=jax.devices()[:1])
    _, _, loss1, grads1 = run_step(one, rules)
    _, _, loss8, grads8 = run_step(mesh_2x4, rules)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    flat1 = jax.tree_util.tree_leaves_with_path(grads1)
    flat8 = jax.tree_util.tree_leaves(grads8)
    for (path, g1), g8 in zip(flat1, flat8, strict=True):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1),
                                   rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # Gradients come back with the parameters' shardings.
    assert grads8["wi"]["kernel"].sharding.spec == P(
        *partitioning.logical_to_mesh_axes(P("embed", "mlp"), rules))


def test_logical_constraints_bind_to_mesh(mesh_2x4):
    """Inside partitioned_jit the activation constraints reach the HLO;
    a plain jit outside axis_rules drops them (flax makes them no-ops)."""
    fn, args, _, _ = run_step(mesh_2x4, RULES_1D)
    text = fn.lower(*args).as_text()
    assert "sharding_constraint" in text or "@Sharding" in text
    plain = jax.jit(step).lower(*args).as_text()
    assert "sharding_constraint" not in plain and "@Sharding" not in plain


def test_axis_rules_context(mesh_2x4):
    assert nn.get_logical_axis_rules() == ()
    with partitioning.axis_rules(mesh_2x4, RULES_2D):
        assert tuple(nn.get_logical_axis_rules()) == RULES_2D
        assert jax.sharding.get_abstract_mesh().shape == mesh_2x4.shape
    assert nn.get_logical_axis_rules() == ()
    assert jax.sharding.get_abstract_mesh().empty


# ------------------------------------------------------------------- data ---

def test_host_local_to_global(mesh_2x4):
    batch = make_batch()
    out = partitioning.host_local_to_global(batch, mesh_2x4)
    for name, local in batch.items():
        arr = out[name]
        assert arr.shape == local.shape
        assert arr.sharding == partitioning.batch_sharding(mesh_2x4)
        assert arr.addressable_shards[0].data.shape == (BATCH // 2, LENGTH)
        np.testing.assert_array_equal(np.asarray(arr), local)
    explicit = partitioning.host_local_to_global(batch, mesh_2x4,
                                                 global_batch_size=BATCH)
    assert explicit["inputs"].shape == (BATCH, LENGTH)


def test_process_data_slice_single_process(mesh_2x4):
    assert partitioning.process_data_slice(128) == (0, 128)
    assert partitioning.process_data_slice(128, mesh=mesh_2x4) == (0, 128)
    with pytest.raises(partitioning.PartitioningError, match="divisible"):
        partitioning.process_data_slice(7, mesh=mesh_2x4)


# --------------------------------------------------------------- describe ---

def test_describe(mesh_2x4):
    variables, shardings = init_sharded(mesh_2x4, RULES_1D)
    text = partitioning.describe(mesh_2x4, shardings, variables)
    assert "data=2, model=4" in text
    lines = {line.split()[0]: line for line in text.splitlines()[2:-1]}
    kernel = lines["['params']['wi']['kernel']"]
    assert "(8, 32)" in kernel and "(-, model)" in kernel
    assert kernel.endswith(f"{EMBED * MLP // 4 * 4} B")
    n_params = VOCAB * EMBED + EMBED * MLP + MLP + MLP * EMBED + EMBED
    assert f"total: {n_params:,} params" in text
