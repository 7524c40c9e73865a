"""ProtTXL throughput: protlm-jax vs the torch Transformer-XL reference, same weights.

Run from the repository root::

    .venv/bin/python benchmarks/txl.py [--layers 2] [--quick]

Measured in one run (JSON lines on stdout, see ``benchmarks/README.md``):

1. The float32 matmul peak (``train_step.bench_peak``), the denominator of
   every MFU.
2. One causal-LM train step with the memory carried (rows of the
   ``uniprot_sample_clm`` stream, segments of ``--segment`` tokens, memory
   ``--segment``), at the published width (d_model 1024, 16 heads x 64,
   d_inner 4096; ``--layers`` of its 30): ours (the Trainer's jitted step,
   AdamW, memory in the train state) against
   :class:`protlm_jax.hf.txl_torch.TransfoXLReference` (the original
   equations, pad-and-reshape shift) forward + backward + ``torch.optim.AdamW``
   with its memory carried; tokens/s, the ratio and both MFUs (analytic
   matmul FLOPs x 3 for forward and backward). transformers 5 has no
   Transformer-XL, so the torch reference is the baseline.
3. Embedding one 35,000-residue protein (real UniProt sequences joined end to
   end: no single protein in the data is that long) in segments of 512 with a
   1,024-token memory, against one-segment embedding, each in a fresh process:
   seconds and peak resident memory. One segment of 35,000 tokens needs the
   [heads, T, T] float32 scores alone (78 GB at 16 heads), so it is run at
   2,000 and 4,000 residues beside segments at the same lengths, and its
   35,000-residue need is stated from the measured growth.
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
SAMPLE = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"


def layer_flops(cfg, rows: int, qlen: int, mlen: int) -> float:
    """Matmul FLOPs of one layer's forward: I = qlen queries over J = mlen + qlen keys."""
    d, hk, f = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner
    i, j = qlen, mlen + qlen
    proj = 2 * rows * i * d * hk * 2 + 2 * rows * j * d * hk * 2 + 2 * j * d * hk  # q,o; k,v; r
    attention = 3 * 2 * rows * hk * i * j  # AC, BD, probs @ v
    return proj + attention + 4 * rows * i * d * f


def _embed_child(spec: str) -> None:
    """In a fresh process: embed one long protein, print seconds and peak RSS."""
    import numpy as np

    from protlm_jax import embed
    from protlm_jax.models import txl

    args = json.loads(spec)
    cfg = txl.preset("prot_txl", n_layer=args["layers"], dropout=0.0,
                     segment_len=args["segment"], eval_mem_len=args["memory"])
    model = txl.TransfoXL(cfg, encoding_only=True)
    import jax
    import jax.numpy as jnp

    params = jax.jit(lambda r: model.init(r, jnp.ones((1, 4), jnp.int32),
                                          with_logits=False))(jax.random.key(0))["params"]
    embedder = embed.Embedder(cfg, params, long_length=1 << 30)  # no engine chunking
    seq = args["sequence"]
    t = time.perf_counter()
    out = dict(embedder.embed([("p", seq)], per_protein=True))
    seconds = time.perf_counter() - t
    assert np.isfinite(out["p"]).all()
    print(json.dumps({"seconds": seconds,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 2 ** 20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="layers of the published width")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2)")
    parser.add_argument("--long", type=int, default=35000, help="residues of the long protein")
    parser.add_argument("--quick", action="store_true", help="tiny model, short protein")
    parser.add_argument("--embed_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.embed_child:
        return _embed_child(args.embed_child)
    out = claim_stdout()
    wall = time.perf_counter()

    import jax
    import numpy as np
    import torch

    from protlm_jax import host_memory, objectives_txl, optimizers, trainer
    from protlm_jax.data import pipeline as data_pipeline
    from protlm_jax.data import sample
    from protlm_jax.hf import engine
    from protlm_jax.hf import txl as hf_txl
    from protlm_jax.hf.txl_torch import TransfoXLReference
    from protlm_jax.models import build_model, txl
    from embed import read_records
    from _common import bench_peak
    import protlm_tasks  # noqa: F401  (the uniprot_sample_clm task)

    malloc_tuning = host_memory.retain_freed_memory()
    if args.quick:
        cfg = txl.preset("prot_txl_tiny")
        args.segment, args.long = 64, 3000
    else:
        cfg = txl.preset("prot_txl", n_layer=args.layers, dropout=0.0)
    cfg = cfg.replace(mem_len=args.segment)
    common = {"quick": args.quick, "model": f"txl d{cfg.d_model} x{cfg.n_layer}",
              "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "loadavg_1m_start": round(os.getloadavg()[0], 2),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "malloc_tuning": malloc_tuning},
              "versions": {p: version(p) for p in ("jax", "flax", "torch")}}
    report = Reporter(out, common)
    peak = bench_peak(report, 512 if args.quick else 2048, 3 if args.quick else 10)

    # -------------------------------------------------------- train step ---
    rows, seg = args.rows, args.segment
    sample_dir = REPO / "data" / "uniprot_sample"
    if not list(sample_dir.glob("train.tfrecord-*")):
        sample.prepare_sample(sample_dir)
    data_cfg = data_pipeline.DataConfig("uniprot_sample_clm", {"stream": seg}, pack=False)
    stream = data_pipeline.batches(data_cfg, rows, seed=0)
    batches = [next(stream) for _ in range(args.steps + 2)]
    opt = optimizers.OptimizerConfig(name="adamw", weight_decay=0.0, eps=1e-6,
                                     schedule=optimizers.ScheduleConfig(name="constant",
                                                                        base=1e-4))
    model, init_inputs = build_model(cfg)
    run = trainer.Trainer(
        model=model, objective=objectives_txl.CLMObjective(), optimizer_config=opt,
        config=trainer.TrainConfig(model_dir="/tmp/protlm-bench-txl", train_steps=1,
                                   batch_size=rows, seed=0),
        model_feature_lengths={"inputs": seg, "targets": seg, "weights": seg},
        init_inputs=init_inputs, devices=jax.devices()[:1])
    state = run.init_state()
    fn = run.train_fn(state)
    params = jax.device_get(state.params)
    ref = TransfoXLReference(hf_txl.hf_config_dict(cfg, "TransfoXLLMHeadModel"))
    tensors = dict(engine.hf_tensors(params, hf_txl.expected_tensors(cfg, prefixed=True)))
    tensors["crit.out_layers.0.weight"] = tensors["transformer.word_emb.emb_layers.0.weight"]
    ref.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in tensors.items()})
    ref.train()
    torch.set_num_threads(os.cpu_count())
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0, eps=1e-6)
    mems = [None]

    def ours_step(b):
        nonlocal state
        state, metrics = fn(state, run._global(b))
        jax.block_until_ready(metrics["loss"])

    def torch_step(b):
        torch_opt.zero_grad()
        o = ref(torch.tensor(b["inputs"]).long(), mems=mems[0], mem_len=seg)
        loss = torch.nn.functional.cross_entropy(o["logits"].reshape(-1, cfg.vocab_size),
                                                 torch.tensor(b["targets"]).long().reshape(-1))
        loss.backward()
        torch_opt.step()
        mems[0] = o["mems"]

    times = {"ours": [], "torch": []}
    for i, b in enumerate(batches):
        for name, step in (("ours", ours_step), ("torch", torch_step)):
            t = time.perf_counter()
            step(b)
            if i >= 2:  # compile / warm up, and the memory filled
                times[name].append(time.perf_counter() - t)
    # Steps after the first see a full memory of `seg` tokens.
    flops = 3 * (cfg.n_layer * layer_flops(cfg, rows, seg, seg)
                 + 2 * rows * seg * cfg.d_model * cfg.vocab_size)
    t_o, t_t = float(np.median(times["ours"])), float(np.median(times["torch"]))
    tokens = rows * seg
    ctx = {"rows": rows, "segment": seg, "memory": seg, "flops": flops, "peak_flops": peak,
           "optimizer": "adamw"}
    report.emit("txl_train_step/protlm_jax", tokens / t_o, "tokens/s", seconds=t_o,
                seconds_steps=times["ours"], mfu=flops / t_o / peak, **ctx)
    report.emit("txl_train_step/torch_reference", tokens / t_t, "tokens/s", seconds=t_t,
                seconds_steps=times["torch"], mfu=flops / t_t / peak, **ctx)
    report.emit("txl_train_step/vs_torch_reference", t_t / t_o, "x", mfu=flops / t_o / peak,
                mfu_torch=flops / t_t / peak, **ctx)

    # --------------------------------------------------------- long embed ---
    records = read_records(SAMPLE, 2000)
    joined = "".join(s for _, s in records)[:args.long]

    def child(length, segment, memory):
        spec = json.dumps({"layers": cfg.n_layer if not args.quick else 2,
                           "segment": segment, "memory": memory,
                           "sequence": joined[:length]})
        env = dict(os.environ, XLA_FLAGS="")
        proc = subprocess.run([sys.executable, __file__, "--embed_child", spec],
                              capture_output=True, text=True, env=env, timeout=1800,
                              cwd=str(Path(__file__).parent))
        if proc.returncode:
            return {"error": proc.stderr.strip().splitlines()[-1][:300]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    seg_len, mem = (64, 128) if args.quick else (512, 1024)
    one = {n: child(n, None, 0) for n in ((500, 1000) if args.quick else (2000, 4000))}
    segmented = {n: child(n, seg_len, mem) for n in (*one, args.long)}
    for n, r in one.items():
        report.emit("txl_embed_long/one_segment", r.get("seconds", float("nan")), "s",
                    residues=n, **r)
    for n, r in segmented.items():
        report.emit("txl_embed_long/segments_with_memory", r.get("seconds", float("nan")), "s",
                    residues=n, segment=seg_len, memory=mem, **r)
    a, b = sorted(one)
    report.emit("txl_embed_long/one_segment_scores_at_long",
                cfg.n_head * args.long ** 2 * 4 / 2 ** 30,
                "GiB", residues=args.long,
                note="[heads, T, T] float32 attention scores alone; one segment is not run")
    nan = float("nan")
    report.emit("txl_embed_long/vs_one_segment",
                one[b].get("seconds", nan) / segmented[b].get("seconds", nan), "x", residues=b,
                peak_rss_gib_one=one[b].get("peak_rss_gib"),
                peak_rss_gib_segments=segmented[b].get("peak_rss_gib"),
                peak_rss_gib_segments_long=segmented[args.long].get("peak_rss_gib"),
                seconds_segments_long=segmented[args.long].get("seconds"),
                growth_one_segment_rss=one[b].get("peak_rss_gib", nan)
                / one[a].get("peak_rss_gib", nan))
    report.emit("run/wall", time.perf_counter() - wall, "s")


if __name__ == "__main__":
    sys.exit(main())
