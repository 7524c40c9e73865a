"""Embeddings: batching never changes a sequence's output, per-protein means see
residues only, layers follow Hugging Face's numbering, chunked attention is
exact with memory linear in the length (a 35,000-residue protein embeds whole),
HDF5 output as ProtTrans writes it, and `protlm embed` on a real checkpoint.

Shape legend: B batch, L residues, T tokens, D d_model.
"""

import gzip
import os
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import read_sample_records
# Imported before any capsys test: the Trainer binds sys.stdout as its default
# log at import, and a capsys stream is closed after its test.
from protlm_jax import cli, embed, partitioning, trainer  # noqa: F401
from protlm_jax.hf import t5 as hf_t5
from protlm_jax.models import layers
from protlm_jax.models import t5
from protlm_jax.data.vocabularies import ProtT5Vocabulary

TINY = t5.preset("prot_t5_tiny")


@pytest.fixture(scope="module")
def records():
    """Real UniProt (id, sequence) pairs from the bundled sample."""
    return read_sample_records(limit=300)


def _one_device_mesh():
    return partitioning.create_mesh(1, devices=jax.devices()[:1])


def _in_one_bucket(recs, n):
    """Records whose tokens (residues + </s>) fall in the 113..144 bucket:
    tests sharing it share compiled programs."""
    return [r for r in recs if 112 < len(r[1]) + 1 <= 144][:n]


@pytest.fixture(scope="module")
def tiny_params():
    tokens = jnp.ones((1, 8), jnp.int32)
    return t5.T5EncoderOnly(TINY).init(jax.random.PRNGKey(0), tokens)["params"]


@pytest.fixture(scope="module")
def embedder(tiny_params):
    # Default mesh: the 8 simulated devices on the data axis.
    return embed.Embedder(TINY, tiny_params, ProtT5Vocabulary())


def _direct(params, seq, config=TINY):
    """The encoder on the one unpadded sequence (residues + </s>), [L+1, D]."""
    vocab = ProtT5Vocabulary()
    ids = np.array([list(vocab.encode(embed.clean_sequence(seq))) + [vocab.eos_id]], np.int32)
    return np.asarray(jax.jit(t5.T5EncoderOnly(config).apply)({"params": params}, ids))[0]


def test_clean_sequence_and_sanitize_id(records):
    assert embed.clean_sequence("mk-t.a Y\nUZOB") == "MKTAYXXXX"
    header = "sp|Q6GZX4|001R_FRG3G Putative transcription factor 001R OS=Frog virus 3 SV=1"
    assert embed.sanitize_id(header) == header.replace(".", "_")
    assert embed.sanitize_id(">UniRef50/P1.2 x") == "UniRef50_P1_2 x"
    # ProtT5 ids after clean-up: rare residues are X (23), never B/O/U/Z.
    ids = ProtT5Vocabulary().encode(embed.clean_sequence("SKTZPUOB"))
    assert list(ids) == [7, 14, 11, 23, 13, 23, 23, 23]


def test_alone_equals_inside_a_padded_bucketed_batch(embedder, records):
    # Sequences of one bucket: they share a padded batch.
    same_bucket = _in_one_bucket(records, 12)
    assert len(same_bucket) >= 6
    batch = dict(embedder.embed(same_bucket))
    assert len({embed.bucket_length(len(s) + 1) for _, s in same_bucket}) == 1
    for ident, seq in same_bucket[:3]:
        (key, alone), = embedder.embed([(ident, seq)])
        assert key == ident and alone.shape == (len(seq), TINY.d_model)
        np.testing.assert_allclose(batch[ident], alone, atol=2e-5, rtol=1e-5)


def test_with_params_embeds_other_weights_on_the_same_programs(embedder, records):
    chosen = _in_one_bucket(records, 4)
    other = t5.T5EncoderOnly(TINY).init(jax.random.PRNGKey(7), jnp.ones((1, 8), jnp.int32))
    fresh = dict(embed.Embedder(TINY, other["params"]).embed(chosen, per_protein=True))
    dict(embedder.embed(chosen, per_protein=True))  # compiles this shape once
    compiled = len(embedder._fns)
    moved = embedder.with_params(other)
    got = dict(moved.embed(chosen, per_protein=True))
    assert len(embedder._fns) == compiled  # nothing new was compiled
    for ident, _ in chosen:
        np.testing.assert_allclose(got[ident], fresh[ident], atol=1e-6, rtol=1e-6)
    before = dict(embedder.embed(chosen[:1], per_protein=True))
    assert not np.allclose(before[chosen[0][0]], got[chosen[0][0]])  # weights differ


def test_per_residue_drops_eos_and_per_protein_is_the_mean_over_residues(
        embedder, tiny_params, records):
    chosen = _in_one_bucket(records, 12)
    per_res = dict(embedder.embed(chosen))
    per_prot = dict(embedder.embed(chosen, per_protein=True))
    for ident, seq in chosen[:2]:
        direct = _direct(tiny_params, seq)                  # [L+1, D] with </s>
        np.testing.assert_allclose(per_res[ident], direct[:len(seq)], atol=2e-5)
        np.testing.assert_allclose(per_prot[ident], direct[:len(seq)].mean(0), atol=2e-5)
        # Neither </s> nor padding enters the mean.
        assert not np.allclose(per_prot[ident], direct.mean(0), atol=1e-4)


def test_layers_follow_hugging_face_hidden_states(records):
    torch.manual_seed(0)
    hf = transformers.T5EncoderModel(hf_t5.hf_config_from_t5config(TINY)).eval()
    params = hf_t5.params_from_state_dict(hf.state_dict(), TINY, encoder_only=True)
    embedder = embed.Embedder(TINY, params, ProtT5Vocabulary(), _one_device_mesh())
    chosen = _in_one_bucket(records, 4)
    out = dict(embedder.embed(chosen, layers=(0, 1, -1)))
    vocab = ProtT5Vocabulary()
    for ident, seq in chosen:
        ids = torch.tensor([list(vocab.encode(seq)) + [1]])
        with torch.no_grad():
            hidden = hf(ids, output_hidden_states=True).hidden_states
        assert out[ident].shape == (3, len(seq), TINY.d_model)
        for k, layer in enumerate((0, 1, 2)):
            np.testing.assert_allclose(out[ident][k], hidden[layer][0, :len(seq)].numpy(),
                                       atol=1e-4, rtol=1e-4)


def test_chunked_encoder_equals_plain(tiny_params, records):
    vocab = ProtT5Vocabulary()
    seqs = [s for _, s in records if 200 < len(s) < 400][:3]
    tokens = np.zeros((3, max(map(len, seqs)) + 1), np.int32)  # padded batch
    for r, s in enumerate(seqs):
        tokens[r, :len(s) + 1] = list(vocab.encode(s)) + [vocab.eos_id]
    assert tokens.shape[1] % 96 and tokens.shape[1] % 160  # not a multiple of a chunk
    plain = jax.jit(t5.T5EncoderOnly(TINY).apply)({"params": tiny_params}, tokens)
    for attn, mlp in ((96, 160), (160, None)):
        cfg = TINY.replace(attention_chunk_size=attn, mlp_chunk_size=mlp)
        chunked = jax.jit(t5.T5EncoderOnly(cfg).apply)({"params": tiny_params}, tokens)
        for r, s in enumerate(seqs):
            np.testing.assert_allclose(chunked[r, :len(s) + 1], plain[r, :len(s) + 1],
                                       atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("bias_kind", ["position", "key_mask", "none"])
def test_query_blocked_attention_equals_one_softmax(bias_kind):
    # 1,100 queries > 2 x 512: blocks of 512, 512 and 76 against all keys.
    b, t, h, k = 2, 1100, 2, 8
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.standard_normal((b, t, h, k)), jnp.float32) for _ in range(3))
    keys = np.arange(t)[None, :] < np.array([[t], [700]])            # row 1: 400 pad keys
    mask = jnp.asarray(keys)[:, None, None, :]
    bias, mask = {"position": (jnp.asarray(rng.standard_normal((1, h, t, t)), jnp.float32), mask),
                  "key_mask": (None, mask), "none": (None, None)}[bias_kind]
    blocked = layers.dot_product_attention(q, kk, v, bias, mask, query_block=512)
    whole = layers.dot_product_attention(q, kk, v, bias, mask, query_block=0)
    logits = jnp.einsum("bthk,bshk->bhts", q, kk) + (0.0 if bias is None else bias)
    if mask is not None:
        logits = logits + np.where(keys, 0.0, -1e30)[:, None, None, :]
    reference = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v)
    np.testing.assert_allclose(blocked, whole, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(blocked, reference, atol=2e-6, rtol=1e-5)


def test_embedder_switches_to_chunks_and_stays_exact(tiny_params, records):
    chosen = _in_one_bucket(records, 6)
    plain = embed.Embedder(TINY, tiny_params, mesh=_one_device_mesh())
    # Buckets above 64 tokens run in 48-token attention / 64-position MLP blocks.
    chunked = embed.Embedder(TINY, tiny_params, mesh=_one_device_mesh(),
                             long_length=64, attention_chunk_size=48, mlp_chunk_size=64)
    a, b = dict(plain.embed(chosen)), dict(chunked.embed(chosen))
    assert any(key[0] for key in chunked._fns) and not any(key[0] for key in plain._fns)
    for ident, _ in chosen:
        np.testing.assert_allclose(a[ident], b[ident], atol=2e-5, rtol=1e-5)


def _temp_bytes(config, params, length):
    fn = jax.jit(t5.T5EncoderOnly(config).apply)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return fn.lower({"params": params}, tokens).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_plain_quadratically(tiny_params):
    chunked = TINY.replace(attention_chunk_size=embed.ATTENTION_CHUNK,
                           mlp_chunk_size=embed.MLP_CHUNK)
    c5, c35 = (_temp_bytes(chunked, tiny_params, n) for n in (5_000, 35_000))
    p5, p35 = (_temp_bytes(TINY, tiny_params, n) for n in (5_000, 35_000))
    assert c35 / c5 < 10          # 7x the length: linear growth (+ constants)
    assert p35 / p5 > 30          # the plain path: ~49x, quadratic
    assert c35 < p35 / 100        # [H, L, L] never materialised


def test_35000_residue_protein_embeds_in_full(records):
    # A titin-sized input from real residues: sample proteins end to end.
    seq, i = "", 0
    while len(seq) < 35_000:
        seq += records[i][1]
        i += 1
    seq = seq[:35_000]
    # One layer, one head: attention work is quadratic in the length and this
    # shows that the whole length runs (memory is asserted above).
    cfg = TINY.replace(num_encoder_layers=1, num_heads=1)
    params = t5.T5EncoderOnly(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
    embedder = embed.Embedder(cfg, params["params"], mesh=_one_device_mesh())
    (ident, emb), = embedder.embed([("titin_sized", seq)], per_protein=False)
    assert ident == "titin_sized" and emb.shape == (35_000, cfg.d_model)
    assert np.isfinite(emb).all()
    assert [key[0] for key in embedder._fns] == [True]       # the chunked encoder ran
    assert np.unique(emb[:1000].round(4), axis=0).shape[0] > 900  # not degenerate


def _write_fasta(path, recs):
    with open(path, "w") as f:
        for header, seq in recs:
            f.write(f">{header}\n{seq}\n")


def _sample_headers(n):
    """(full header, sequence) of the first n sample records."""
    from conftest import SAMPLE

    out, header, parts = [], None, []
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith(">"):
                if header is not None:
                    out.append((header, "".join(parts)))
                    if len(out) == n:
                        return out
                header, parts = line[1:], []
            else:
                parts.append(line.strip())
    return out


_REALLOC_FAULTS = """
import resource, numpy as np
from protlm_jax import host_memory
applied = host_memory.retain_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(16 << 20, np.float32); del a          # 64 MB, above glibc's mmap ceiling
before = faults()
for _ in range(4):
    a = np.ones(16 << 20, np.float32); del a
print(applied, (faults() - before) / 4)
"""


@pytest.mark.parametrize("tuning", ["1", "0"])
def test_allocator_tuning_reuses_freed_blocks(tuning):
    # What the Embedder sets: a 64 MB block freed and asked for again comes
    # back without page faults. Untuned, glibc unmaps it, and touching it
    # again faults at least once per 2 MB (even with transparent huge pages).
    out = subprocess.run([sys.executable, "-c", _REALLOC_FAULTS], check=True, text=True,
                         capture_output=True,
                         env=dict(os.environ, PROTLM_MALLOC_TUNING=tuning)).stdout.split()
    applied, faults_per_block = out[0] == "True", float(out[1])
    if tuning == "1":
        assert applied and faults_per_block < 8
    else:
        assert not applied and faults_per_block >= 32


def test_hdf5_keys_attributes_and_rerun_skip(embedder, tmp_path):
    recs = _in_one_bucket(_sample_headers(400), 24)
    assert any("." in h for h, _ in recs)  # sanitising has work to do
    first, rest = recs[:10], recs
    _write_fasta(tmp_path / "a.fasta", first)
    _write_fasta(tmp_path / "b.fasta", rest)
    out = str(tmp_path / "e.h5")
    stats = embed.embed_fasta(embedder, str(tmp_path / "a.fasta"), out, progress=False)
    assert stats["embedded"] == 10 and stats["skipped_existing"] == 0
    stats = embed.embed_fasta(embedder, str(tmp_path / "b.fasta"), out, progress=False)
    assert stats["embedded"] == 14 and stats["skipped_existing"] == 10
    assert stats["residues"] == sum(len(s) for _, s in recs[10:])
    with h5py.File(out, "r") as h5:
        assert set(h5.keys()) == {embed.sanitize_id(h) for h, _ in recs}
        for header, seq in recs:
            ds = h5[embed.sanitize_id(header)]
            assert ds.attrs["original_id"] == header.strip()
            assert ds.attrs["length"] == len(seq) and ds.shape == (len(seq), TINY.d_model)
    with pytest.raises(embed.ProtlmError, match="per_protein"):
        embed.embed_fasta(embedder, str(tmp_path / "b.fasta"), out, per_protein=True,
                          progress=False)


def test_duplicate_ids_are_an_error(embedder, tmp_path):
    recs = _sample_headers(3)
    _write_fasta(tmp_path / "d.fasta", recs + [recs[1]])
    with pytest.raises(embed.InputError, match="duplicate id") as e:
        embed.embed_fasta(embedder, str(tmp_path / "d.fasta"), str(tmp_path / "d.h5"),
                          progress=False)
    assert e.value.line == 7


def _cli(capsys, *argv):
    rc = cli.main(["embed", *map(str, argv)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_cli_one_line_errors(tmp_path, capsys):
    recs = _sample_headers(2)
    bad = tmp_path / "bad.fasta"
    bad.write_text(f">{recs[0][0]}\n{recs[0][1]}\n>{recs[1][0]}\n{recs[1][1][:20]}42\n")
    rc, err = _cli(capsys, "--model", tmp_path / "missing", "--input", bad,
                   "--output", tmp_path / "x.h5")
    assert rc == 2 and err == [f"protlm: error: {tmp_path / 'missing'}: no such model directory"]
    model_dir = tmp_path / "empty_model"
    model_dir.mkdir()
    rc, err = _cli(capsys, "--model", model_dir, "--input", bad, "--output", tmp_path / "x.h5")
    assert rc == 2 and len(err) == 1 and "neither a training MODEL_DIR" in err[0]


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory, prepared_sample):
    """A tiny ProtT5 trained for 2 steps with `protlm train` (gin, in process)."""
    from protlm_jax import gin_config

    model_dir = tmp_path_factory.mktemp("model")
    gin_config.parse(["gin/experiments/prot_t5_tiny_demo.gin"], [
        ("MODEL_DIR", str(model_dir)), ("TRAIN_STEPS", "2"), ("CHECKPOINT_PERIOD", "2"),
        ("LOG_PERIOD", "1"), ("BATCH_SIZE", "8"),
        ("TASK_FEATURE_LENGTHS", "{'inputs': 64, 'targets': 64}"),
        ("train.eval_data_config", "None")])
    gin_config.train()
    return model_dir


def test_protlm_embed_from_a_training_checkpoint(trained_model_dir, tmp_path, capsys):
    import orbax.checkpoint as ocp

    recs = _in_one_bucket(_sample_headers(400), 30)
    fasta_path = tmp_path / "in.fasta"
    _write_fasta(fasta_path, recs)
    out = tmp_path / "out.h5"
    rc, err = _cli(capsys, "--model", trained_model_dir, "--input", fasta_path,
                   "--output", out, "--per_protein", "--no_progress")
    assert rc == 0, err
    assert f"embedded {len(recs)} sequences" in err[-1] and len(recs) > 20
    # The same numbers from the whole checkpoint restored independently.
    path = os.path.join(trained_model_dir, "checkpoints", "2", "state")
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
    full = jax.device_get(checkpointer.restore(path, target)["params"])
    params = {"token_embedder": full["token_embedder"], "encoder": full["encoder"]}
    config = embed.load_model(str(trained_model_dir)).config  # the demo gin's shape
    assert config.d_ff != TINY.d_ff
    with h5py.File(out, "r") as h5:
        for header, seq in recs[:2]:
            want = _direct(params, seq, config)[:len(seq)].mean(0)
            np.testing.assert_allclose(h5[embed.sanitize_id(header)][()], want, atol=2e-5)
    # Bad FASTA with a real model: one line naming the file and record line.
    bad = tmp_path / "bad.fasta"
    bad.write_text(f">{recs[0][0]}\n{recs[0][1]}\n>{recs[1][0]}\n{recs[1][1][:20]}42\n")
    rc, err = _cli(capsys, "--model", trained_model_dir, "--input", bad,
                   "--output", tmp_path / "bad.h5", "--no_progress")
    assert rc == 2 and err == [f"protlm: error: {bad}:3: record "
                               f"{recs[1][0].split()[0]!r}: invalid characters"]
    rc, err = _cli(capsys, "--model", trained_model_dir, "--input", fasta_path,
                   "--output", tmp_path / "s.h5", "--step", "7", "--no_progress")
    assert rc == 2 and len(err) == 1 and "no checkpoint of step 7" in err[0]
