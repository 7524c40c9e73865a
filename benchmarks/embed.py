"""Embedding throughput and memory: protlm-jax ``Embedder`` vs Hugging Face
``T5EncoderModel`` on torch CPU, same weights, same real FASTA, float32.

Run from the repository root::

    .venv/bin/python benchmarks/embed.py [--num N] [--model prot_t5_base] [--quick]

Measured in one run (JSON lines on stdout, see ``benchmarks/README.md``):

1. The float32 matmul peak (``train_step.bench_peak``: jitted ``jnp.dot`` and
   ``torch.mm`` of 2048x2048), probed again between the forward timings; the
   highest rate measured is the denominator of every forward MFU.
2. Residues/s embedding the first N records of the UniProt query set
   (``data/fetched/uniprot20k/QUERY.fasta.gz``; the bundled sample if absent)
   per residue, with a ``prot_t5_base``-shaped encoder whose random weights
   are HF's initialisation converted to ours (``params_from_hf_state_dict``):
   ours (cold: compiling included; warm: the same call again), HF with
   ProtTrans' own batching (``prott5_embedder.py``: longest first, batches of
   < 4,000 residues and <= 100 sequences, sequences over 1,000 alone) and HF
   as most scripts do (input order, batches of 8 padded to the longest).
3. One encoder forward at fixed shapes (>= 256 tokens): seconds and MFU, ours
   and HF, interleaved.

Ours and the baselines run in interleaved rounds (best of each), all under the
allocator setting ``Embedder`` makes (``protlm_jax.host_memory``).
4. Peak resident memory (``VmHWM``) embedding one protein of 1k, 5k, 20k
   and 35k residues, each in its own subprocess under an address-space limit
   (``--memory_limit_gb``) so running out is an exception, never the kernel's
   OOM killer; ``status`` is ``ok`` or ``oom``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import Reporter, claim_stdout, version

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
QUERY = REPO / "data" / "fetched" / "uniprot20k" / "QUERY.fasta.gz"
SAMPLE = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"
PROTTRANS_MAX_RESIDUES = 4000   # prott5_embedder.py defaults
PROTTRANS_MAX_SEQ_LEN = 1000
PROTTRANS_MAX_BATCH = 100
NAIVE_BATCH = 8
TARGET_VS_PROTTRANS = 1.2
TARGET_VS_NAIVE = 2.0
TARGET_MFU = 0.7
FORWARD_SHAPES = ((1, 256), (4, 256), (16, 256), (4, 1024))


def read_records(path: Path, num: int) -> list[tuple[str, str]]:
    from protlm_jax import embed
    from protlm_jax.data import fasta

    out = []
    for rec in fasta.read_fasta(str(path)):
        out.append((rec.id, embed.clean_sequence(rec.sequence)))
        if len(out) == num:
            break
    return out


def encode(vocab, seq: str) -> list[int]:
    return list(vocab.encode(seq)) + [vocab.eos_id]


def forward_flops(cfg, rows: int, tokens: int) -> float:
    """Analytic FLOPs of one encoder forward on [rows, tokens] (matmuls only)."""
    inner = cfg.num_heads * cfg.d_kv
    dense = 2 * (4 * cfg.d_model * inner + 2 * cfg.d_model * cfg.d_ff)   # per token
    attention = 2 * 2 * tokens * inner                                     # QK^T and PV
    return float(cfg.num_encoder_layers * rows * tokens * (dense + attention))


# ------------------------------------------------------------- baselines ---

def hf_embed(model, vocab, batches) -> dict:
    """ProtTrans' loop body: pad to the longest, last_hidden_state[i, :L]."""
    import numpy as np
    import torch

    out = {}
    with torch.no_grad():
        for batch in batches:
            ids = [encode(vocab, s) for _, s in batch]
            width = max(map(len, ids))
            input_ids = torch.zeros((len(ids), width), dtype=torch.long)
            for r, x in enumerate(ids):
                input_ids[r, :len(x)] = torch.tensor(x)
            hidden = model(input_ids, attention_mask=(input_ids != 0).long()).last_hidden_state
            for r, (ident, seq) in enumerate(batch):
                out[ident] = np.asarray(hidden[r, :len(seq)].numpy())
    return out


def prottrans_batches(records):
    """``prott5_embedder.py``'s batching (longest first, residue budget)."""
    ordered = sorted(records, key=lambda r: len(r[1]), reverse=True)
    batches, batch = [], []
    for idx, (ident, seq) in enumerate(ordered, 1):
        batch.append((ident, seq))
        n_res = sum(len(s) for _, s in batch) + len(seq)
        if (len(batch) >= PROTTRANS_MAX_BATCH or n_res >= PROTTRANS_MAX_RESIDUES
                or idx == len(ordered) or len(seq) > PROTTRANS_MAX_SEQ_LEN):
            batches.append(batch)
            batch = []
    return batches


def naive_batches(records):
    return [records[i:i + NAIVE_BATCH] for i in range(0, len(records), NAIVE_BATCH)]


# ----------------------------------------------------------------- memory ---

def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Unlike ``ru_maxrss``,
    which Linux carries over ``execve`` from the parent, it starts afresh."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(impl: str, length: int, model: str, layers: int, limit_gb: float) -> dict:
    """Runs in a subprocess: embeds one protein of ``length`` residues."""
    limit = int(limit_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    records = read_records(QUERY if QUERY.exists() else SAMPLE, 2000)
    seq = "".join(s for _, s in records)[:length]
    from protlm_jax.models import t5

    cfg = t5.preset(model, num_encoder_layers=layers, dropout_rate=0.0)
    start_rss = _peak_rss_mb()
    t = time.perf_counter()
    try:
        if impl == "protlm_jax":
            import jax
            import jax.numpy as jnp

            from protlm_jax import embed

            params = t5.T5EncoderOnly(cfg).init(jax.random.PRNGKey(0),
                                                jnp.ones((1, 8), jnp.int32))["params"]
            embedder = embed.Embedder(cfg, params)
            start_rss = _peak_rss_mb()
            t = time.perf_counter()
            (_, emb), = embedder.embed([("x", seq)])
        else:
            import torch
            import transformers

            from protlm_jax.hf import t5 as hf_t5
            from protlm_jax.data.vocabularies import ProtT5Vocabulary

            torch.set_num_threads(os.cpu_count())
            hf = transformers.T5EncoderModel(hf_t5.hf_config_from_t5config(cfg)).eval()
            start_rss = _peak_rss_mb()
            t = time.perf_counter()
            ids = torch.tensor([encode(ProtT5Vocabulary(), seq)])
            with torch.no_grad():
                emb = hf(ids).last_hidden_state[0, :length].numpy()
        status = "ok" if emb.shape[0] == length else "truncated"
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        status = "oom"
    return {"status": status, "seconds": time.perf_counter() - t,
            "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": start_rss}


def bench_memory(report: Reporter, args) -> None:
    for length in args.memory_lengths:
        for impl in ("protlm_jax", "hf_torch"):
            cmd = [sys.executable, __file__, "--_memory_child", impl, str(length),
                   "--model", args.memory_model, "--memory_layers", str(args.memory_layers),
                   "--memory_limit_gb", str(args.memory_limit_gb)]
            print(f"memory: {impl} L={length}", file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, XLA_FLAGS=""))
            line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")),
                        None)
            result = json.loads(line) if line else {
                "status": "oom" if proc.returncode in (-9, 137) else "failed",
                "returncode": proc.returncode, "stderr_tail": proc.stderr[-300:]}
            report.emit(f"memory/{impl}/{length}", result.pop("peak_rss_mb", float("nan")),
                        "MB", residues=length, model=args.memory_model,
                        encoder_layers=args.memory_layers,
                        limit_gb=args.memory_limit_gb, **result)


# ------------------------------------------------------------------- main ---

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=120, help="records embedded")
    parser.add_argument("--model", default="prot_t5_base")
    parser.add_argument("--token_budget", type=int, default=4096)
    parser.add_argument("--memory_model", default=None,
                        help="width of the memory runs (default: --model)")
    parser.add_argument("--memory_layers", type=int, default=1,
                        help="encoder layers in the memory runs (peak is per layer)")
    parser.add_argument("--memory_lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1000, 5000, 20000, 35000])
    parser.add_argument("--memory_limit_gb", type=float, default=16.0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of ours and the baselines (best of each)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 40 records, memory at 1k and 5k: a smoke run")
    parser.add_argument("--_memory_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        impl, length = args._memory_child
        print(json.dumps(memory_child(impl, int(length), args.model, args.memory_layers,
                                      args.memory_limit_gb)))
        return
    if args.quick:
        args.num, args.model = min(args.num, 40), "prot_t5_tiny"
        args.memory_lengths = [1000, 5000]
    args.memory_model = args.memory_model or args.model
    out = claim_stdout()
    wall = time.perf_counter()

    import jax
    import numpy as np
    import torch
    import transformers

    from protlm_jax import embed, host_memory, partitioning
    from protlm_jax.hf import t5 as hf_t5
    from protlm_jax.models import t5
    from protlm_jax.data.vocabularies import ProtT5Vocabulary
    from _common import bench_peak, matmul_rate_probe

    # The allocator setting the Embedder makes, made before anything is
    # measured: the peak, ours and the torch baseline all run under it.
    malloc_tuning = host_memory.retain_freed_memory()

    data = QUERY if QUERY.exists() else SAMPLE
    common = {"quick": args.quick, "model": args.model, "data": str(data.relative_to(REPO)),
              "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "loadavg_1m_start": round(os.getloadavg()[0], 2),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "malloc_tuning": malloc_tuning},
              "versions": {p: version(p) for p in ("jax", "flax", "torch", "transformers")}}
    report = Reporter(out, common)
    peak = bench_peak(report, 512 if args.quick else 2048, 3 if args.quick else 10)

    records = read_records(data, args.num)
    residues = sum(len(s) for _, s in records)
    cfg = t5.preset(args.model, dropout_rate=0.0)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    hf = transformers.T5EncoderModel(hf_t5.hf_config_from_t5config(cfg)).eval()
    params = hf_t5.params_from_state_dict(hf.state_dict(), cfg, encoder_only=True)
    mesh = partitioning.create_mesh(1, devices=jax.devices()[:1])
    embedder = embed.Embedder(cfg, params, ProtT5Vocabulary(), mesh)
    vocab = ProtT5Vocabulary()
    ctx = {"records": len(records), "residues": residues, "dtype": "float32"}

    def run_ours():
        t = time.perf_counter()
        result = dict(embedder.embed(records, token_budget=args.token_budget))
        return result, time.perf_counter() - t

    hf_runs = [] if args.no_hf else [
        ("prottrans_batching", prottrans_batches(records), TARGET_VS_PROTTRANS),
        ("naive_batch8", naive_batches(records), TARGET_VS_NAIVE)]
    # Rounds interleave ours and the baselines (best of the rounds for each),
    # so a slow spell of a shared machine does not fall on one side only.
    ours, t_cold = run_ours()
    t_warm, t_hf, theirs = [], {name: [] for name, _, _ in hf_runs}, {}
    for _ in range(args.rounds):
        t_warm.append(run_ours()[1])
        for name, batches, _ in hf_runs:
            t = time.perf_counter()
            theirs[name] = hf_embed(hf, vocab, batches)
            t_hf[name].append(time.perf_counter() - t)
    best = min(t_warm)
    plan = embedder._plan([(i, encode(vocab, s)) for i, s in records], args.token_budget)
    flops = sum(forward_flops(cfg, rows, bucket) for bucket, rows, _ in plan)
    slots = sum(rows * bucket for bucket, rows, _ in plan)
    ours_ctx = dict(ctx, batches=len(plan), compiled_shapes=len({(b, r) for b, r, _ in plan}),
                    padding_efficiency=(residues + len(records)) / slots,
                    token_budget=args.token_budget)
    report.emit("embed/protlm_jax_cold", residues / t_cold, "residues/s", seconds=t_cold,
                **ours_ctx)
    report.emit("embed/protlm_jax", residues / best, "residues/s", seconds=best,
                seconds_rounds=t_warm, mfu_padded=flops / best / peak, **ours_ctx)
    for name, batches, target in hf_runs:
        t_base = min(t_hf[name])
        diff = max(float(np.abs(theirs[name][i] - ours[i]).max()) for i, _ in records[:20])
        report.emit(f"embed/hf_torch_{name}", residues / t_base, "residues/s",
                    seconds=t_base, seconds_rounds=t_hf[name], batches=len(batches), **ctx)
        report.emit(f"embed/vs_hf_{name}", residues / best, "residues/s",
                    baseline=residues / t_base, speedup=t_base / best,
                    speedup_cold=t_base / t_cold, target_speedup=target,
                    meets_speedup=t_base / best >= target, max_abs_diff=diff, **ctx)

    # One forward at fixed shapes: MFU once batches hold >= 256 tokens. Each
    # shape runs rounds of (matmul peak, ours, HF); every MFU divides by the
    # highest peak measured anywhere in the run (the most conservative).
    fn = embedder._fn(False, (cfg.num_encoder_layers,), False, "float32")
    rng = np.random.default_rng(0)
    peak_probe = matmul_rate_probe(512 if args.quick else 2048)
    forward_lines = []
    for rows, length in FORWARD_SHAPES[:2] if args.quick else FORWARD_SHAPES:
        tokens = rng.integers(3, 26, size=(rows, length)).astype(np.int32)
        ids = torch.from_numpy(tokens).long()
        jax.block_until_ready(fn(embedder.params, tokens))
        mine, theirs_s = [], []
        with torch.no_grad():
            if not args.no_hf:
                hf(ids)
            for _ in range(3):
                peak = max(peak, peak_probe())
                t = time.perf_counter()
                jax.block_until_ready(fn(embedder.params, tokens))
                mine.append(time.perf_counter() - t)
                if not args.no_hf:
                    t = time.perf_counter()
                    hf(ids)
                    theirs_s.append(time.perf_counter() - t)
        line = {"rows": rows, "length": length, "tokens": rows * length,
                "flops": forward_flops(cfg, rows, length), "seconds": min(mine)}
        if theirs_s:
            line["seconds_hf"] = min(theirs_s)
        forward_lines.append(line)
    for line in forward_lines:
        f = line["flops"]
        line.update(peak_flops=peak, mfu=f / line["seconds"] / peak, target_mfu=TARGET_MFU,
                    meets_mfu=f / line["seconds"] / peak >= TARGET_MFU)
        if "seconds_hf" in line:
            line["mfu_hf"] = f / line["seconds_hf"] / peak
        report.emit(f"forward/{line['rows']}x{line['length']}", f / line["seconds"],
                    "FLOP/s", **line)

    if not args.no_memory:
        bench_memory(report, args)
    report.emit("run/wall", time.perf_counter() - wall, "s")


if __name__ == "__main__":
    main()
