"""The partitioned trainer: sharded steps equal one-device steps, microbatching
equals one batch, non-finite updates are refused, and a killed run resumes to
the same parameters as an uninterrupted one."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from protlm_jax import objectives, optimizers, trainer
from protlm_jax.data import pipeline as data_pipeline
from protlm_jax.models import t5

from conftest import REPO

LENGTHS = {"inputs": 64, "targets": 64}
TINY = t5.preset("prot_t5_tiny", dropout_rate=0.1)


# Adaptive optimizers divide by √v: at the first steps a near-zero gradient's
# last-bit noise becomes a ±lr update, so equal programs summed in another order
# diverge. What these tests check is the partitioned forward/backward and the
# accumulation, so they use SGD, whose update is linear in the gradient.
SGD = optimizers.OptimizerConfig(name="sgd", b1=0.9, schedule=optimizers.ScheduleConfig(
    name="constant", base=0.5))
ADAFACTOR = optimizers.OptimizerConfig(
    schedule=optimizers.ScheduleConfig(name="rsqrt", base=1.0, warmup_steps=10))


def _trainer(tmp_path, *, model_parallel_size=1, devices=None, microbatches=1,
             batch_size=8, config=TINY, optimizer=SGD):
    data = data_pipeline.DataConfig("uniprot_sample_prott5", LENGTHS)
    converter = data_pipeline.feature_converter(data.task, data.pack)
    run = trainer.Trainer(
        model=t5.T5(config), objective=objectives.EncDecObjective(),
        optimizer_config=optimizer,
        config=trainer.TrainConfig(model_dir=str(tmp_path), train_steps=3,
                                   batch_size=batch_size, microbatches=microbatches,
                                   model_parallel_size=model_parallel_size, seed=1),
        model_feature_lengths=converter.get_model_feature_lengths(LENGTHS),
        init_inputs=("encoder_input_tokens", "decoder_input_tokens"), devices=devices)
    return run, data


def _three_steps(run, data):
    state = run.init_state()
    fn = run.train_fn(state)
    batches = data_pipeline.batches(data, run.config.batch_size, seed=1)
    losses = []
    for _ in range(3):
        state, m = fn(state, run._global(next(batches)))
        losses.append(float(m["loss"]) / float(m["weight"]))
    return jax.device_get(state.params), losses


def test_sharded_2x4_steps_equal_one_device(tmp_path, prepared_sample):
    sharded, data = _trainer(tmp_path / "a", model_parallel_size=4)
    assert dict(sharded.mesh.shape) == {"data": 2, "model": 4}
    single, _ = _trainer(tmp_path / "b", devices=jax.devices()[:1])
    assert dict(single.mesh.shape) == {"data": 1, "model": 1}
    p_sharded, l_sharded = _three_steps(sharded, data)
    p_single, l_single = _three_steps(single, data)
    np.testing.assert_allclose(l_sharded, l_single, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 p_sharded, p_single)
    assert l_single[0] != l_single[2]  # the steps did change something


def test_sharded_adafactor_losses_match(tmp_path, prepared_sample):
    config = TINY.replace(dropout_rate=0.0)
    sharded, data = _trainer(tmp_path / "a", model_parallel_size=4, config=config,
                             optimizer=ADAFACTOR)
    single, _ = _trainer(tmp_path / "b", devices=jax.devices()[:1], config=config,
                         optimizer=ADAFACTOR)
    np.testing.assert_allclose(_three_steps(sharded, data)[1],
                               _three_steps(single, data)[1], rtol=1e-5)


def test_microbatches_equal_one_batch(tmp_path, prepared_sample):
    config = TINY.replace(dropout_rate=0.0)  # dropout masks depend on the split
    whole, data = _trainer(tmp_path / "a", config=config, batch_size=32)
    micro, _ = _trainer(tmp_path / "b", microbatches=4, config=config, batch_size=32)
    p_whole, l_whole = _three_steps(whole, data)
    p_micro, l_micro = _three_steps(micro, data)
    np.testing.assert_allclose(l_whole, l_micro, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 p_whole, p_micro)


def test_nonfinite_update_is_not_applied(tmp_path, prepared_sample):
    run, data = _trainer(tmp_path)
    run.objective = _PoisonedObjective()
    state = run.init_state()
    before = jax.device_get(state.params)
    batch = next(data_pipeline.batches(data, 8, seed=1))
    batch = dict(batch, encoder_input_tokens=batch["encoder_input_tokens"] * 0 - 1)
    state, metrics = run.train_fn(state)(state, run._global(batch))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(state.step) == 1  # the data position still advances
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def _train_cmd(model_dir, *extra, experiment="prot_t5_tiny_demo"):
    lengths = {"prot_t5_tiny_demo": "{'inputs': 64, 'targets': 64}",
               "prot_xlnet_tiny_demo": "{'inputs': 64, 'target_positions': 11}",
               "prot_txl_tiny_demo": "{'stream': 32}"}.get(
                   experiment, "{'inputs': 64}")
    return [sys.executable, "-m", "protlm_jax.cli", "train",
            f"--gin_file=gin/experiments/{experiment}.gin",
            f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=8",
            "--gin.CHECKPOINT_PERIOD=3", "--gin.LOG_PERIOD=2", "--gin.BATCH_SIZE=8",
            f"--gin.TASK_FEATURE_LENGTHS={lengths}",
            "--gin.train.eval_data_config=None", *extra]


def _final_params(model_dir, part="params"):
    import orbax.checkpoint as ocp

    path = os.path.join(model_dir, "checkpoints", "8", "state")
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto this process's first device, whatever mesh wrote it.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
    return jax.device_get(checkpointer.restore(path, target)[part])


def _env(prepared_sample, devices=1):
    root, _ = prepared_sample
    env = dict(os.environ, PROTLM_DATA_DIR=str(root), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               # The runs of one test compile the same programs: share them (the
               # executables are identical, so results are too; only time changes).
               JAX_COMPILATION_CACHE_DIR=str(root.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["prot_t5_tiny_demo", "prot_txl_tiny_demo"])
def test_kill_and_resume_equals_uninterrupted(tmp_path, prepared_sample, experiment):
    """ProtT5 (Adafactor) and ProtTXL, whose train state carries each stream's
    memory: params and memories after kill -9 and resume equal an
    uninterrupted run bit for bit."""
    env = _env(prepared_sample)
    whole = tmp_path / "whole"
    proc = subprocess.run(_train_cmd(whole, experiment=experiment), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.run(_train_cmd(killed, "--gin.train.kill_at_step=7",
                                     experiment=experiment), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9  # SIGKILL, possibly while a save was in flight
    proc = subprocess.run(_train_cmd(killed, experiment=experiment), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stdout
    # The gin config is saved beside every checkpoint (in its metadata).
    import json

    steps = [p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
    assert "8" in steps
    for step in steps:
        meta = json.loads((killed / "checkpoints" / step / "metadata" / "metadata").read_text())
        assert "TRAIN_STEPS = 8" in meta["gin_config"]
    assert (whole / "config.gin").exists()
    assert (whole / "checkpoints" / "operative_config.gin").exists()
    a, b = _final_params(whole), _final_params(killed)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    if experiment == "prot_txl_tiny_demo":
        mem_a, mem_b = _final_params(whole, "carry"), _final_params(killed, "carry")
        assert mem_a["mems"].shape == (8, 2, 64, 64)
        assert int(mem_a["mem_valid"].min()) == 64 and np.abs(mem_a["mems"]).sum() > 0
        jax.tree.map(np.testing.assert_array_equal, mem_a, mem_b)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["prot_t5_tiny_demo", "prot_bert_tiny_demo"])
def test_two_processes_equal_one(tmp_path, prepared_sample, experiment):
    """Two CPU processes (gloo) on a 4-device mesh train exactly like one
    process with 4 devices: each process reads only its own data shard.
    ProtT5 (span objective, Adafactor) and ProtBert (MLM, LAMB)."""
    shards = "--gin.train/DataConfig.num_data_shards=2"
    one = tmp_path / "one"
    proc = subprocess.run(_train_cmd(one, shards, experiment=experiment), cwd=REPO,
                          capture_output=True,
                          text=True, env=_env(prepared_sample, devices=4), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(prepared_sample, devices=2)
        env.update(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}")
        procs.append(subprocess.Popen(_train_cmd(two, shards, experiment=experiment),
                                      cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "step 8" in outs[0][0] and "step 8" not in outs[1][0]  # only process 0 logs
    # Gloo sums across processes in another order than XLA within one: last bits
    # (2.4e-7 on a 0.013 weight after 8 steps on an AVX-512 machine).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 _final_params(one), _final_params(two))


class _PoisonedObjective(objectives.EncDecObjective):
    """The loss becomes NaN for batches carrying the marker token -1."""

    def __call__(self, model, params, batch, rng, deterministic):
        loss, sums = super().__call__(model, params, batch, rng, deterministic)
        poisoned = jax.numpy.any(batch["encoder_input_tokens"] < 0)
        return loss * jax.numpy.where(poisoned, jax.numpy.nan, 1.0), sums


def test_nonfinite_loss_stops_the_loop_and_keeps_the_last_good_checkpoint(
        tmp_path, prepared_sample):
    from protlm_jax.checkpoints import Checkpointer
    from protlm_jax.errors import ProtlmError

    run, data = _trainer(tmp_path)
    run.objective = _PoisonedObjective()
    # Logged only at the end: the steps are checked before each checkpoint, so step 6's
    # (written after the skipped step 5) is never saved.
    run.config = trainer.TrainConfig(model_dir=str(tmp_path), train_steps=8, batch_size=8,
                                     checkpoint_period=2, log_period=8, seed=1,
                                     async_checkpoints=False)

    def make_batches(start):
        for i, batch in enumerate(data_pipeline.batches(data, 8, seed=1, start_batch=start)):
            if start + i == 4:  # the 5th step
                batch = dict(batch, encoder_input_tokens=batch["encoder_input_tokens"] * 0 - 1)
            yield batch

    with pytest.raises(ProtlmError, match=r"non-finite loss or gradient at step 5.*"
                                          r"Last good checkpoint: step 4"):
        run.train(make_batches)
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    assert checkpointer.latest_step() == 4
    state, _ = checkpointer.restore(4, run.init_state())
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.parametrize("rule_set", ["1d", "2d"])
@pytest.mark.parametrize("name", ["prot_t5_tiny", "prot_t5_xl_uniref50"])
def test_every_parameter_resolves_under_both_rule_sets(name, rule_set):
    from protlm_jax import partitioning

    mesh = partitioning.create_mesh(4)  # 2 × 4 on the 8 simulated devices
    rules = partitioning.standard_logical_axis_rules(rule_set)
    for scan in (False, True):
        abstract = t5.abstract_params(t5.preset(name, scan_layers=scan))
        shardings, shapes = partitioning.param_shardings(abstract, mesh, rules)
        leaves = jax.tree.leaves(shardings)
        assert leaves and len(leaves) == len(jax.tree.leaves(shapes))
        # The big matrices really are split over the model axis.
        assert any("model" in str(s.spec) for s in leaves)
        if rule_set == "2d":
            assert any("data" in str(s.spec) for s in leaves)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_state_is_sharded_like_the_parameters(tmp_path, name):
    run, _ = _trainer(tmp_path, model_parallel_size=4, optimizer=optimizers.OptimizerConfig(
        name=name, schedule=optimizers.ScheduleConfig(name="constant", base=1e-3)))
    state = run.init_state()

    def per_device(tree):
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))

    # Nothing big is replicated: each device holds about a quarter of the
    # parameters (the model axis is 4 wide) and of AdamW's two moments.
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert per_device(state.params) < 0.5 * total
    if name == "adamw":
        assert per_device(state.opt_state) < 0.5 * 2 * total
