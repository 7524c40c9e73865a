"""``protlm plan`` on 8 simulated CPU devices: abstract compilation of the train
step reports the memory the shardings imply, XLA's FLOPs, and a step-time
prediction, without ever allocating model-size arrays."""

import argparse
import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from protlm_jax import objectives, objectives_ae, optimizers, plan, trainer
from protlm_jax.cli import plan as plan_cmd
from protlm_jax.errors import ProtlmError
from protlm_jax.data.feature_converters import MLMFeatureConverter
from protlm_jax.models import bert, electra, t5

LENGTHS = seqio.EncDecFeatureConverter(pack=True).get_model_feature_lengths(
    {"inputs": 32, "targets": 32})
TINY = t5.preset("prot_t5_tiny")
ADAFACTOR = optimizers.OptimizerConfig()
PEAK = 1e12


def _train_config(batch_size=8, **kw):
    return trainer.TrainConfig(model_dir="/unused", train_steps=1000,
                               batch_size=batch_size, **kw)


def _live_bytes():
    return sum(a.nbytes for a in jax.live_arrays())


def _plan(mesh, batch_size=8, config=TINY, lengths=LENGTHS, **kw):
    return plan.plan(config, ADAFACTOR, _train_config(batch_size), lengths, mesh, PEAK, **kw)


@pytest.fixture(scope="module")
def plans():
    before = _live_bytes()
    result = {mesh: _plan(mesh) for mesh in ((1, 1), (2, 4))}
    # Abstract all the way: nothing near the model's size was materialised
    # (the tiny model alone is ~0.7 MB of parameters).
    assert _live_bytes() - before < 64 * 1024
    return result


def _abstract_params(config=TINY):
    return t5.abstract_params(config)


def _expected_param_bytes(model_parallel, boxed=None):
    """Per-device bytes by hand: a dimension named vocab/mlp/heads/joined_kv
    is split over the model axis (rules "1d"); everything else is replicated."""
    split_names = {"vocab", "mlp", "heads", "joined_kv"}
    boxed = _abstract_params() if boxed is None else boxed
    specs = jax.tree.leaves(
        nn.get_partition_spec(boxed),
        is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec))
    shapes = jax.tree.leaves(nn.unbox(boxed))
    total = 0
    for spec, shape in zip(specs, shapes, strict=True):
        n = math.prod(shape.shape)
        names = tuple(spec) if spec is not None else ()
        # At most one dimension per array can take the model axis.
        if any(name in split_names for name in names):
            n //= model_parallel
        total += n * 4  # float32 parameters
    return total


def test_param_bytes_match_the_rules(plans):
    assert plans[(1, 1)]["param_bytes"] == _expected_param_bytes(1)
    assert plans[(2, 4)]["param_bytes"] == _expected_param_bytes(4)
    # The feed-forward kernels really are split 4 ways: [D, F] → [D, F/4].
    mlp = TINY.d_model * TINY.d_ff * 4
    layers = 2 * TINY.num_encoder_layers + 2 * TINY.num_decoder_layers  # wi + wo
    assert plans[(1, 1)]["param_bytes"] - plans[(2, 4)]["param_bytes"] >= layers * mlp * 3 // 4


def test_total_params_and_bytes(plans):
    leaves = jax.tree.leaves(nn.unbox(_abstract_params()))
    count = sum(x.size for x in leaves)
    for result in plans.values():
        assert result["total_params"] == count
        assert result["param_bytes_total"] == 4 * count
    assert plans[(1, 1)]["param_bytes"] == plans[(1, 1)]["param_bytes_total"]


def test_memory_numbers(plans):
    for result in plans.values():
        for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes",
                    "opt_state_bytes", "batch_bytes"):
            assert result[key] > 0, key
        # The compiled program's arguments are the state shards plus the batch.
        state = result["param_bytes"] + result["opt_state_bytes"] + result["batch_bytes"]
        assert result["argument_bytes"] >= state * 0.99
        assert result["argument_bytes"] <= state * 1.01 + 1024
    # Sharding the model and the batch over 8 devices shrinks everything.
    assert plans[(2, 4)]["temp_bytes"] < plans[(1, 1)]["temp_bytes"]
    assert plans[(2, 4)]["batch_bytes"] * 2 == plans[(1, 1)]["batch_bytes"]


def test_flops_are_per_device_on_the_partitioned_program(plans):
    one, eight = plans[(1, 1)], plans[(2, 4)]
    assert one["flops_per_device"] > 0
    # The global (unpartitioned) count does not depend on the mesh ...
    assert eight["flops_global"] == pytest.approx(one["flops_global"], rel=1e-6)
    # ... the compiled one is the per-device share (plus replicated work).
    assert one["flops_global"] / 8 < eight["flops_per_device"] < one["flops_global"] / 4


def test_flops_scale_with_batch(plans):
    double = _plan((2, 4), batch_size=16)
    ratio = double["flops_per_device"] / plans[(2, 4)]["flops_per_device"]
    assert 1.9 < ratio <= 2.0
    assert double["tokens_per_step"] == 2 * plans[(2, 4)]["tokens_per_step"] == 16 * 32


def test_timing(plans):
    r = plans[(2, 4)]
    assert r["step_seconds_at_peak"] == pytest.approx(r["flops_per_device"] / PEAK)
    assert r["step_seconds"] == pytest.approx(r["step_seconds_at_peak"] / 0.5)
    assert r["tokens_per_second"] == pytest.approx(r["tokens_per_step"] / r["step_seconds"])
    assert r["train_days"] == pytest.approx(1000 * r["step_seconds"] / 86400)
    text = plan.format_plan(r)
    for needle in ("2 x 4 = 8", "parameters", "XLA temporaries", "tokens/s at MFU 0.5"):
        assert needle in text


def test_target_mesh_scales_throughput():
    r = _plan((2, 4), target_data_parallelism=16, assumed_mfu=0.25)
    target = r["target"]
    assert target["devices"] == 64 and target["batch_size"] == 64
    assert target["step_seconds"] == pytest.approx(r["step_seconds"])
    assert target["tokens_per_second"] == pytest.approx(8 * r["tokens_per_second"])
    assert "on 16 x 4 (64 devices)" in plan.format_plan(r)


@pytest.mark.slow
def test_scanned_flops_are_extrapolated_from_probes():
    # XLA counts a scanned layer stack's body once; the probes must recover the
    # FLOPs of the same model with its layers unrolled.
    scanned = _plan((2, 4), config=TINY.replace(scan_layers=True, remat_policy="full"))
    unrolled = _plan((2, 4), config=TINY.replace(remat_policy="full"))
    assert unrolled["flops_method"] == "compiled"
    assert scanned["flops_method"].startswith("depth-extrapolated")
    assert scanned["flops_per_device_uncorrected"] < 0.75 * unrolled["flops_per_device"]
    np.testing.assert_allclose(scanned["flops_per_device"], unrolled["flops_per_device"],
                               rtol=1e-3)
    np.testing.assert_allclose(scanned["flops_global"], unrolled["flops_global"], rtol=1e-3)


def test_too_few_devices_is_a_clear_error():
    with pytest.raises(ProtlmError, match="xla_force_host_platform_device_count=16"):
        _plan((4, 4))


def test_cli_run(capsys, monkeypatch):
    from protlm_jax.data import pipeline as data_pipeline

    parser = argparse.ArgumentParser()
    plan_cmd.add_arguments(parser)
    args = parser.parse_args(["--mesh=2x4", "--peak_tflops=2", "--batch_per_data_shard=2",
                              "--target_mesh=32x4", "--mfu=0.4"])
    data = data_pipeline.DataConfig("uniprot_sample_prott5", {"inputs": 32, "targets": 32})
    train_config = _train_config(batch_size=128, model_parallel_size=8)
    result = plan_cmd.run(args, (TINY, train_config, data, ADAFACTOR,
                             objectives.EncDecObjective()))
    assert result["mesh"] == {"data": 2, "model": 4}
    assert result["batch_size"] == 4 and result["peak_flops_per_device"] == 2e12
    assert result["target"]["batch_size"] == 64
    out = capsys.readouterr().out
    assert "tokens/s at MFU 0.4" in out and "on 32 x 4 (128 devices)" in out


def test_cli_bad_mesh():
    parser = argparse.ArgumentParser()
    plan_cmd.add_arguments(parser)
    args = parser.parse_args(["--mesh=eight"])
    data = dataclasses.make_dataclass("D", [("task", str), ("pack", bool)])
    with pytest.raises(ProtlmError, match="DATAxMODEL"):
        plan_cmd.run(args, (TINY, _train_config(), data("x", True)))


MLM_LENGTHS = MLMFeatureConverter(pack=True).get_model_feature_lengths({"inputs": 32})


@pytest.mark.parametrize("name", ["prot_bert_tiny", "prot_electra_tiny"])
def test_bert_family_plans(name):
    """BERT and ELECTRA plan through models.build_model with their own objective:
    the parameters are the model's, split 4 ways by the same rules as T5's."""
    if name.startswith("prot_electra"):
        config, family = electra.preset(name), "electra"
        boxed = electra.abstract_params(config)
    else:
        config, family = bert.preset(name), "bert"
        boxed = bert.abstract_params(config)
    result = _plan((2, 4), config=config, lengths=MLM_LENGTHS)
    assert result["family"] == family
    count = sum(x.size for x in jax.tree.leaves(nn.unbox(boxed)))
    assert result["total_params"] == count and result["param_bytes_total"] == 4 * count
    assert result["param_bytes"] == _expected_param_bytes(4, boxed)
    # The feed-forward kernels really are split 4 ways: [D, F] -> [D, F/4].
    towers = (config.discriminator, config.generator) if family == "electra" else (config,)
    mlp = sum(2 * c.num_hidden_layers * c.hidden_size * c.intermediate_size * 4 for c in towers)
    assert result["param_bytes_total"] - result["param_bytes"] >= mlp * 3 // 4
    assert result["flops_per_device"] > 0 and result["flops_method"] == "compiled"
    assert result["tokens_per_step"] == 8 * 32
    assert f"{family}: {count:,} params" in plan.format_plan(result)
    assert isinstance(plan.default_objective(config),
                      objectives_ae.ElectraObjective if family == "electra"
                      else objectives_ae.MLMObjective)


def test_stack_depth_probes_per_family():
    """The FLOP probes vary one stack at a time: T5 encoder/decoder, ELECTRA
    discriminator/generator, one BERT/ALBERT stack (ALBERT as one shared group)."""
    assert plan.stack_depths(TINY) == (TINY.num_encoder_layers, TINY.num_decoder_layers)
    e = electra.preset("prot_electra_tiny")
    probe = plan.with_stack_depths(e.replace(discriminator=e.discriminator.replace(
        scan_layers=True)), (2, 1))
    assert (probe.discriminator.num_hidden_layers, probe.generator.num_hidden_layers) == (2, 1)
    assert not probe.discriminator.scan_layers
    albert = bert.preset("prot_albert", num_hidden_groups=3, num_hidden_layers=12)
    assert plan.stack_depths(albert) == (12,)
    probe = plan.with_stack_depths(albert, (1,))
    assert (probe.num_hidden_layers, probe.num_hidden_groups) == (1, 1)


@pytest.mark.slow
def test_scanned_albert_flops_are_extrapolated_from_probes():
    # ALBERT's shared layer scanned (params broadcast) is a loop XLA counts once.
    config = bert.preset("prot_albert_tiny")
    scanned = _plan((2, 4), config=config.replace(scan_layers=True), lengths=MLM_LENGTHS)
    unrolled = _plan((2, 4), config=config, lengths=MLM_LENGTHS)
    assert scanned["flops_method"].startswith("depth-extrapolated")
    assert scanned["flops_per_device_uncorrected"] < 0.75 * unrolled["flops_per_device"]
    np.testing.assert_allclose(scanned["flops_per_device"], unrolled["flops_per_device"],
                               rtol=1e-3)

