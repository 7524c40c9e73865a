"""Fault and bad-input suite: what a hostile or unlucky user does, and the exact outcome.

Every case ends in one of three ways, asserted: a one-line error with exit
status 2 (no traceback), a correct result, or a fallback with a warning. The
numbers in the test names follow the reliability issue's list (README,
"Reliability"). Tiny models and small real files keep it lean.
"""

import collections
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import REPO, SAMPLE, random_params, read_sample_records

from protlm_jax import cli, embed, gin_config
from protlm_jax.checkpoints import Checkpointer
from protlm_jax.data import fetch, pipeline, sources
from protlm_jax.embed import io as embed_io
from protlm_jax.errors import InputError, ProtlmError
from protlm_jax.hf import convert


LAST = {}


def run_cli(capsys, *argv):
    """(exit status, stderr) of ``protlm ARGV`` run in this process (stdout in LAST)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    LAST["out"] = captured.out
    return rc, captured.err


def one_line_error(rc, err, *needles):
    lines = [x for x in err.splitlines() if x.startswith("protlm: error:")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    """40 real UniProt proteins (bundled sample), 30-400 residues."""
    records = [r for r in read_sample_records(SAMPLE) if 30 <= len(r[1]) <= 400][:40]
    path = tmp_path_factory.mktemp("fasta") / "sample.fasta"
    path.write_text("".join(f">{i} real protein\n{s}\n" for i, s in records))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A ProtT5-tiny MODEL_DIR with two checkpoints (steps 3 and 6)."""
    path = str(tmp_path_factory.mktemp("model"))
    ckpt = Checkpointer(path, keep=10, async_save=False)
    import jax.numpy as jnp

    for step, seed in ((3, 0), (6, 1)):
        cfg, params = random_params("t5", "prot_t5_tiny", seed)
        ckpt.save(step, {"step": jnp.asarray(step, jnp.int32), "params": params},
                  {"model_config": dataclasses.asdict(cfg), "model_family": "t5",
                   "step": step})
    ckpt.close()
    return path


@pytest.fixture(scope="module")
def reference_h5(tmp_path_factory, model_dir, fasta):
    """The uninterrupted embedding of ``fasta`` by ``model_dir`` (step 6)."""
    out = str(tmp_path_factory.mktemp("ref") / "ref.h5")
    embed_io.embed_fasta(embed.load_model(model_dir), fasta, out, progress=False)
    return out


def assert_same_h5(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert dict(fa.attrs.items()).keys() == dict(fb.attrs.items()).keys()
        for k, v in fa.attrs.items():
            assert np.array_equal(np.asarray(v), np.asarray(fb.attrs[k])), k
        assert sorted(fa) == sorted(fb)
        for key in fa:
            assert np.array_equal(fa[key][()], fb[key][()]), key
            assert dict(fa[key].attrs) == dict(fb[key].attrs), key


# ------------------------------------------------- 1, 12: atomic embed output ---

def test_1_ten_seeded_kills_then_rerun_equal_an_uninterrupted_run(tmp_path, model_dir, fasta,
                                                                    reference_h5):
    out = str(tmp_path / "killed.h5")
    cmd = [sys.executable, "-m", "protlm_jax.cli", "embed", "--model", model_dir,
           "--input", fasta, "--output", out, "--no_progress", "--token_budget", "512"]
    rng = random.Random(16)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    outcomes = []
    for _ in range(10):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env)
        deadline = time.time() + 120
        while not os.path.exists(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.0))  # anywhere: compiling, writing, flushing
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
        outcomes.append(proc.returncode)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert -signal.SIGKILL in outcomes  # at least some runs really were killed
    assert_same_h5(out, reference_h5)


def test_1_7_full_disk_then_rerun(tmp_path, capsys, model_dir, fasta, reference_h5):
    """A real full disk on a small tmpfs where one can be mounted (root), else
    the kernel's file-size limit (EFBIG) as the simulated full disk."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
        capture_output=True).returncode == 0
    out = str(small / "out.h5")
    import resource

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        if not mounted:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, old_limit[1]))
        rc, err = run_cli(capsys, "embed", "--model", model_dir, "--input", fasta,
                          "--output", out, "--no_progress")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    try:
        one_line_error(rc, err, out)
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        rc, err = run_cli(capsys, "embed", "--model", model_dir, "--input", fasta,
                          "--output", out, "--no_progress")
        assert rc == 0, err
        assert_same_h5(out, reference_h5)
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)


def test_1_incomplete_record_is_redone(tmp_path, capsys, model_dir, fasta, reference_h5):
    out = str(tmp_path / "partial.h5")
    shutil.copy(reference_h5, out)
    with h5py.File(out, "a") as h5:
        first, second = sorted(h5)[:2]
        del h5[first].attrs["length"]               # array written, not marked complete
        data = h5[second][()]
        del h5[second]
        h5.create_dataset(second, data=np.zeros_like(data[:1]))  # zero rows, no attrs
    rc, err = run_cli(capsys, "embed", "--model", model_dir, "--input", fasta,
                      "--output", out, "--no_progress")
    assert rc == 0 and "2 incomplete records redone" in err, err
    assert_same_h5(out, reference_h5)


def test_12_another_models_output_is_refused(tmp_path, capsys, model_dir, fasta, reference_h5):
    out = str(tmp_path / "other.h5")
    shutil.copy(reference_h5, out)
    rc, err = run_cli(capsys, "embed", "--model", model_dir, "--step", 3, "--input", fasta,
                      "--output", out, "--no_progress")
    one_line_error(rc, err, out, "step=6, asked step=3")
    assert_same_h5(out, reference_h5)


def test_12_nul_in_a_header_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                  model_dir, fasta):
    bad = tmp_path / "nul.fasta"
    text = open(fasta).read().splitlines()
    text[4] = text[4][:3] + "\x00" + text[4][3:]
    bad.write_text("\n".join(text) + "\n")
    out = tmp_path / "nul.h5"
    rc, err = run_cli(capsys, "embed", "--model", model_dir, "--input", bad, "--output", out,
                      "--no_progress")
    one_line_error(rc, err, f"{bad}:5:", "control character")
    assert not out.exists()


def test_12_max_length_leaves_out_and_counts(tmp_path, capsys, model_dir, fasta):
    out = tmp_path / "short.h5"
    longer = sum(len(s) > 200 for _, s in read_fasta_plain(fasta))
    rc, err = run_cli(capsys, "embed", "--model", model_dir, "--input", fasta, "--output", out,
                      "--no_progress", "--max_length", 200, "--per_protein")
    assert rc == 0 and f"{longer:,} left out (longer than --max_length 200)" in err, err
    with h5py.File(out) as h5:
        assert len(h5) == 40 - longer and all(h5[k].attrs["length"] <= 200 for k in h5)


def read_fasta_plain(path):
    out, ident = [], None
    for line in open(path):
        if line.startswith(">"):
            ident = line[1:].strip()
        else:
            out.append((ident, line.strip()))
    return out


def test_fasta_reader_fuzz(tmp_path, fasta):
    """Seeded byte-level mutations of a real FASTA file: the reader gives
    records or an InputError naming the file, never anything else."""
    data = open(fasta, "rb").read()
    rng = random.Random(7)
    alphabet = b">\n\r\t \x00\x01\x7f\xff*-.XUZ0123456789acgtACGT|/"
    outcomes = {"records": 0, "error": 0}
    path = tmp_path / "fuzz.fasta"
    for _ in range(150):
        buf = bytearray(data[:rng.randrange(0, 3000)])
        for _ in range(rng.randrange(1, 8)):
            op, pos = rng.random(), rng.randrange(0, len(buf) + 1)
            if op < 0.4:
                buf[pos:pos] = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
            elif op < 0.7:
                del buf[pos:pos + rng.randrange(1, 20)]
            else:
                buf[pos:pos] = buf[max(0, pos - 200):pos]   # a repeated header or line
        path.write_bytes(bytes(buf))
        try:
            records = embed_io._read_fasta(str(path), collections.Counter())
            assert all(k and s.isalpha() for k, s, _, _ in records)
            outcomes["records"] += 1
        except InputError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["records"] and outcomes["error"]


# -------------------------------------------------- 2, 3: verified checkpoints ---

def _damage(model_dir, how):
    """A copy of ``model_dir`` whose latest checkpoint (step 6) is damaged."""
    dst = model_dir + f"-{how}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(model_dir, dst)
    step = os.path.join(dst, "checkpoints", "6")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(step) for f in fs
                   if os.path.getsize(os.path.join(r, f)) > 1000)
    target = files[0]
    if how == "flipped_byte":
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
    elif how == "truncated":
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    elif how == "deleted_file":
        os.remove(target)
    elif how == "garbage_metadata":
        meta = [os.path.join(r, f) for r, _, fs in os.walk(step) for f in fs
                if "metadata" in r.split(os.sep)[-1]]
        with open(meta[0], "w") as f:
            f.write("{not json")
    return dst


DAMAGES = ("flipped_byte", "truncated", "deleted_file", "garbage_metadata")


@pytest.mark.parametrize("how", DAMAGES)
def test_2_3_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, capsys, model_dir,
                                                                 fasta, how):
    damaged = _damage(model_dir, how)
    out = tmp_path / "fallback.h5"
    rc, err = run_cli(capsys, "embed", "--model", damaged, "--input", fasta, "--output", out,
                      "--no_progress", "--per_protein")
    assert rc == 0, err
    assert "damaged checkpoint skipped" in err and os.path.join("checkpoints", "6") in err, err
    with h5py.File(out) as h5:
        assert int(h5.attrs["step"]) == 3
    ref = tmp_path / "step3.h5"
    embed_io.embed_fasta(embed.load_model(model_dir, 3), fasta, str(ref), per_protein=True,
                         progress=False)
    with h5py.File(out) as a, h5py.File(ref) as b:
        assert all(np.array_equal(a[k][()], b[k][()]) for k in b)
    rc, err = run_cli(capsys, "export-hf", "--model", damaged, "--output", tmp_path / "hf",
                      "--encoder_only")
    assert rc == 0 and "damaged checkpoint skipped" in err, err
    rc, err = run_cli(capsys, "embed", "--model", damaged, "--step", 6, "--input", fasta,
                      "--output", tmp_path / "x.h5", "--no_progress")
    one_line_error(rc, err, "damaged checkpoint")


def test_3_probe_falls_back_from_a_damaged_step(tmp_path, capsys, model_dir):
    damaged = _damage(model_dir, "flipped_byte")
    rc, err = run_cli(capsys, "probe", "--task", "scl2205", "--model", damaged, "--output",
                      tmp_path / "probe", "--train_limit", 40, "--test_limit", 10,
                      "--epochs", 1, "--head", "fnn", "--quiet")
    assert rc == 0 and "damaged checkpoint skipped" in err, err
    assert json.load(open(tmp_path / "probe" / "result.json"))


# ------------------------------------------------- 5, 6, 8, 11, 12: training ---

@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_sample):
    """A ProtT5-tiny run of 4 steps, checkpoints at 2 and 4 (the real CLI)."""
    path = str(tmp_path_factory.mktemp("train"))
    args = train_args(path)
    assert cli.main(args) == 0
    return path, args


def train_args(model_dir, *extra):
    return ["train", "--gin_file", "gin/experiments/prot_t5_tiny_demo.gin",
            f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2",
            "--gin.LOG_PERIOD=2", "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}",
            "--gin.train.eval_data_config=None", *extra]


def test_3_eval_and_train_resume_fall_back_from_a_damaged_step(tmp_path, capsys, trained):
    path, _ = trained
    run = str(tmp_path / "run")
    shutil.copytree(path, run)
    with open(os.path.join(run, "checkpoints", "4", "metadata", "metadata"), "w") as f:
        f.write("garbage")
    rc, err = run_cli(capsys, "eval", "--gin_file", "gin/models/prot_t5_tiny.gin",
                      "--gin_file", "gin/runs/eval.gin", f"--gin.MODEL_DIR={run}",
                      "--gin.MIXTURE_OR_TASK_NAME=uniprot_sample_prott5",
                      "--gin.EVAL_BATCHES=1", "--gin.BATCH_SIZE=8",
                      "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}")
    assert rc == 0 and "damaged checkpoint skipped" in err, err
    assert json.loads(LAST["out"].strip().splitlines()[-1])["step"] == 2
    rc, err = run_cli(capsys, *train_args(run))
    assert rc == 0 and "damaged checkpoint skipped" in err, err
    assert "resumed from step 2" in LAST["out"], LAST["out"]
    assert os.path.isdir(os.path.join(run, "checkpoints", "4.damaged"))
    assert 4 in Checkpointer(run, async_save=False).all_steps()


def test_11_12_refused_runs_are_one_line_and_leave_config_gin(tmp_path, capsys, trained):
    path, _ = trained
    run = str(tmp_path / "run")
    shutil.copytree(path, run)
    before = open(os.path.join(run, "config.gin")).read()
    # 11: a mistyped value, reaching the configurable at call time
    rc, err = run_cli(capsys, *train_args(run, "--gin.TRAIN_STEPS=abc", "--gin.SEED=1"))
    one_line_error(rc, err)
    assert "In call to configurable" not in err
    # 12: a refused resume (another seed) leaves config.gin as it was
    rc, err = run_cli(capsys, *train_args(run, "--gin.TRAIN_STEPS=6", "--gin.SEED=1"))
    one_line_error(rc, err, "seed")
    # 11: another model shape
    rc, err = run_cli(capsys, *train_args(run, "--gin.TRAIN_STEPS=6",
                                          "--gin.T5Config.d_ff=48"))
    one_line_error(rc, err, "does not fit this model")
    # gin syntax
    rc, err = run_cli(capsys, *train_args(run, "--gin.TRAIN_STEPS=[1,"))
    one_line_error(rc, err)
    assert open(os.path.join(run, "config.gin")).read() == before


def test_5_gin_imports_and_names_are_checked(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.gin"
    evil.write_text("include 'gin/experiments/prot_t5_tiny_demo.gin'\n"
                    "from __gin__ import dynamic_registration\nimport os\n"
                    f"os.system.command = 'touch {marker}'\n")
    rc, err = run_cli(capsys, "train", "--gin_file", evil, f"--gin.MODEL_DIR={tmp_path / 'm'}")
    one_line_error(rc, err, f"{evil}:2:", "dynamic_registration")
    wrapper = tmp_path / "wrapper.gin"
    wrapper.write_text(f"include '{tmp_path / 'inner.gin'}'\n")
    (tmp_path / "inner.gin").write_text("import subprocess\n")
    rc, err = run_cli(capsys, "train", "--gin_file", wrapper, f"--gin.MODEL_DIR={tmp_path}")
    one_line_error(rc, err, "inner.gin:1:", "'subprocess'")
    rc, err = run_cli(capsys, "train", "--gin_file", "gin/experiments/prot_t5_tiny_demo.gin",
                      f"--gin.MODEL_DIR={tmp_path / 'm'}",
                      "--gin.SEED\nimport os\nx=1")
    one_line_error(rc, err, "not a gin name")
    assert not marker.exists() and not (tmp_path / "m" / "config.gin").exists()


def test_8_bad_training_data_is_named(tmp_path, prepared_sample):
    root, _ = prepared_sample
    data = tmp_path / "data"
    shutil.copytree(root / "uniprot_sample", data / "uniprot_sample")
    shards = sorted(str(p) for p in (data / "uniprot_sample").glob("train.tfrecord-*"))
    config = pipeline.DataConfig("uniprot_sample_prott5", {"inputs": 64, "targets": 64})
    previous = sources.data_dir()
    sources.set_data_dir(str(data))
    try:
        with open(shards[1], "r+b") as f:   # truncated mid-record
            f.truncate(os.path.getsize(shards[1]) - 7)
        batches = pipeline.batches(config, 8, seed=0)
        with pytest.raises(ProtlmError, match=rf"^{shards[1]}: corrupt or truncated"):
            for _ in range(400):
                next(batches)
        open(shards[1], "wb").close()        # one empty shard: a warning, training goes on
        with _warnings("protlm_jax") as seen:
            next(pipeline.batches(config, 8, seed=0))
        assert any("1 of 4 train shard files are empty" in m for m in seen)
        for s in shards:                     # all empty
            open(s, "wb").close()
        with pytest.raises(ProtlmError, match="all 4 train shard files are empty"):
            pipeline.batches(config, 8, seed=0)
        for s in shards:
            os.remove(s)
        with pytest.raises(ProtlmError, match="no train shard files|shard file is gone"):
            pipeline.batches(config, 8, seed=0)
    finally:
        sources.set_data_dir(previous)


class _warnings:
    def __init__(self, name):
        import logging

        self.logger, self.seen = logging.getLogger(name), []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.seen.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self.seen

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


# ------------------------------------------- 4, 9, 10, 11: untrusted HF input ---

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model_dir):
    out = str(tmp_path_factory.mktemp("hf") / "t5")
    convert.export_hf(model_dir, out, encoder_only=True)
    return out


def _hf_copy(src, dst, config=None, tensors=None, raw_config=None):
    shutil.copytree(src, dst)
    if raw_config is not None:
        with open(os.path.join(dst, "config.json"), "wb") as f:
            f.write(raw_config)
    elif config is not None:
        c = json.load(open(os.path.join(src, "config.json")))
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(config(c), f)
    if tensors is not None:
        from safetensors.numpy import load_file, save_file

        t = load_file(os.path.join(src, "model.safetensors"))
        save_file(tensors(t), os.path.join(dst, "model.safetensors"))
    return dst


@pytest.mark.parametrize("edit,match", [
    (dict(config=lambda c: {**c, "num_layers": 10 ** 9}), "num_layers 1000000000"),
    (dict(config=lambda c: {**c, "num_layers": 5}), "num_layers 5 but the checkpoint holds 2"),
    (dict(config=lambda c: {**c, "num_heads": 0}), "num_heads 0"),
    (dict(config=lambda c: {**c, "layer_norm_epsilon": "abc"}), "layer_norm_epsilon 'abc'"),
    (dict(config=lambda c: {**c, "dropout_rate": [0.1]}), "dropout_rate [0.1]"),
    (dict(config=lambda c: {**c, "relative_attention_max_distance": 10 ** 12}),
     "relative_attention_max_distance"),
    (dict(raw_config=b'{"model_type": "t5", "d_model": 32, "x": "\xff\xfe"}'), "not UTF-8"),
    (dict(tensors=lambda t: {**t, "shared.weight": t["shared.weight"].astype(np.int32)}),
     "dtype int32; weights must be floating point"),
    (dict(tensors=lambda t: {**t, "shared.weight": np.where(
        np.arange(t["shared.weight"].size).reshape(t["shared.weight"].shape) == 5, np.nan,
        t["shared.weight"]).astype(np.float32)}), "1 non-finite values"),
])
def test_4_9_11_bad_hf_files_give_one_line(tmp_path, capsys, hf_dir, fasta, edit, match):
    bad = _hf_copy(hf_dir, str(tmp_path / "bad"), **edit)
    started = time.time()
    rc, err = run_cli(capsys, "embed", "--model", bad, "--input", fasta,
                      "--output", tmp_path / "o.h5", "--no_progress")
    one_line_error(rc, err, match)
    assert time.time() - started < 60


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "ABSOLUTE", 7, None])
def test_10_index_entries_stay_inside_the_model_directory(tmp_path, hf_dir, shard):
    bad = _hf_copy(hf_dir, str(tmp_path / "bad"))
    os.makedirs(tmp_path / "elsewhere")
    elsewhere = str(tmp_path / "elsewhere" / "model.safetensors")
    shutil.move(os.path.join(bad, "model.safetensors"), elsewhere)
    shard = elsewhere if shard == "ABSOLUTE" else shard   # a readable file, outside
    from safetensors import safe_open

    with safe_open(elsewhere, "np") as f:
        names = list(f.keys())
    with open(os.path.join(bad, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: shard for n in names}}, f)
    with pytest.raises(ProtlmError) as info:
        convert.load(bad)
    assert "\n" not in str(info.value)
    assert ("outside the model directory" if isinstance(shard, str)
            else "pair of strings") in str(info.value)


def test_config_json_fuzz(tmp_path, hf_dir):
    """Seeded random values for config.json keys: a load or one ProtlmError line,
    in bounded time, never another exception."""
    base = json.load(open(os.path.join(hf_dir, "config.json")))
    keys = [k for k, v in base.items() if isinstance(v, (int, float, str, bool))]
    values = [0, -1, 1, 3, 10 ** 9, 10 ** 18, 1e308, -0.5, 0.5, "", "abc", None, [], {}, True,
              [1, 2], "NaN"]
    rng = random.Random(3)
    loaded = refused = 0
    for i in range(40):
        c = dict(base)
        for k in rng.sample(keys, rng.randrange(1, 4)):
            c[k] = rng.choice(values)
        d = tmp_path / f"c{i}"
        d.mkdir()
        os.symlink(os.path.join(hf_dir, "model.safetensors"), d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(c))
        started = time.time()
        try:
            convert.load(str(d))
            loaded += 1
        except ProtlmError as e:
            assert "\n" not in str(e)
            refused += 1
        assert time.time() - started < 30, c
    assert loaded and refused


# ----------------------------------------------------- 12, 13: data commands ---

def test_12_fetch_rehashes_cached_files(tmp_path):
    name = "proteome938293"
    dataset = fetch.DATASETS_BY_NAME[name]
    src = REPO / "data" / "fetched"
    shutil.copytree(src / name, tmp_path / name)
    assert fetch._read_stamp(dataset, tmp_path) is not None
    member = tmp_path / dataset.members[0].dest
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 1                     # same size, other content
    member.write_bytes(bytes(data))
    assert fetch._read_stamp(dataset, tmp_path) is None


def test_12_prepare_bad_output_and_empty_input(tmp_path, capsys):
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    rc, err = run_cli(capsys, "prepare", "--input", empty, "--output", tmp_path / "out")
    one_line_error(rc, err, f"{empty}:0: no FASTA records")
    assert not list((tmp_path / "out").glob("*.tfrecord-*"))
    rc, err = run_cli(capsys, "prepare", "--input", SAMPLE, "--output", empty)
    one_line_error(rc, err, "is not a folder")


def test_13_prepare_on_a_local_dask_cluster_equals_direct(tmp_path, capsys):
    """A scheduler and two worker processes on 127.0.0.1, started here."""
    scheduler_file = tmp_path / "scheduler.json"
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file",
                               str(scheduler_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)]
    try:
        deadline = time.time() + 120
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [dask, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1",
                 "--nthreads", "1", "--no-dashboard", "--memory-limit", "3GB"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path))
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
        common = ["--input", SAMPLE, "--no_progress", "--dedup", "--validation_fraction", 0.1,
                  "--num_shards", 4]
        rc, err = run_cli(capsys, "prepare", "--output", tmp_path / "direct", *common)
        assert rc == 0, err
        rc, err = run_cli(capsys, "prepare", "--output", tmp_path / "dask", *common,
                          "--runner", "DaskRunner", "--dask_scheduler_file", scheduler_file)
        assert rc == 0, err
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(30)
    direct = sorted(os.listdir(tmp_path / "direct"))
    assert direct == sorted(os.listdir(tmp_path / "dask")) and len(direct) == 6
    for name in direct:
        assert (tmp_path / "direct" / name).read_bytes() == \
            (tmp_path / "dask" / name).read_bytes(), name


def test_13_probe_leaves_out_and_counts_long_test_proteins():
    from protlm_jax.probes import datasets

    task = datasets.load_task("scl2205", max_test_length=300, train_limit=50)
    assert "left out test proteins longer than 300 residues" in task.notes
    assert all(len(s) <= 300 for t in task.tests.values() for s in t.sequences)


def test_5_gin_parse_refuses_imports(tmp_path):
    """The library entry point (not only the CLI) refuses an import of os."""
    evil = tmp_path / "e.gin"
    evil.write_text("import os\n")
    with pytest.raises(ProtlmError, match=r"e\.gin:1: gin: import of 'os' is refused"):
        gin_config.parse([str(evil)], [])


def test_7_export_and_import_on_a_full_disk_leave_no_partial_files(tmp_path, capsys,
                                                                     model_dir, hf_dir):
    """The kernel's file-size limit (EFBIG) as a full disk: one line, exit 2, and
    no temporary shard or orbax folder left behind."""
    import resource

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, old_limit[1]))
        export = run_cli(capsys, "export-hf", "--model", model_dir, "--output",
                         tmp_path / "hf")
        imported = run_cli(capsys, "import-hf", "--input", hf_dir, "--output",
                           tmp_path / "imported")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    one_line_error(*export)
    one_line_error(*imported)
    assert not [n for n in os.listdir(tmp_path / "hf") if n.endswith(".tmp")]
    left = [n for _, ds, fs in os.walk(tmp_path / "imported") for n in ds + fs
            if "tmp" in n]
    assert not left, left


def test_12_library_messages_reach_the_user_as_one_line():
    """torch's ANSI-coloured text and gin's call suffix are cut from what is shown."""
    from protlm_jax import errors

    raw = ("\x1b[31mRuntimeError\x1b[0m: shape mismatch\n   at layer 3\n"
           "  In call to configurable 'train' (<function train at 0x7f>)")
    assert errors.one_line(raw) == "RuntimeError: shape mismatch at layer 3"
    assert len(errors.one_line("x" * 1000)) == 400
