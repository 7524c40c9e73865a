"""ProtXLNet throughput: protlm-jax vs Hugging Face XLNet on torch CPU, same weights.

Run from the repository root::

    .venv/bin/python benchmarks/xlnet.py [--num 60] [--layers 2] [--quick]

Measured in one run (JSON lines on stdout, see ``benchmarks/README.md``):

1. The float32 matmul peak (``train_step.bench_peak``), the denominator of
   every MFU.
2. Residues/s embedding the first N records of the UniProt query set
   (``data/fetched/uniprot20k/QUERY.fasta.gz``; the bundled sample if absent)
   per residue with an XLNet of the published width (d_model 1024, 16 heads x
   64, d_inner 4096; ``--layers`` of its 30) whose random weights are
   ``XLNetModel``'s initialisation converted to ours: ``protlm embed``'s
   ``Embedder`` against ``XLNetModel`` with ProtTrans' batching (longest
   first, batches of < 4,000 residues and <= 100 sequences, sequences over
   1,000 alone), both left-padded ``residues <sep> <cls>``, interleaved rounds
   (best of each). Target: >= 1.2x.
3. One permutation-LM train step on the same batch (``uniprot_sample_plm``
   rows: perm_mask and target_mapping as the objective builds them): ours
   (the Trainer's jitted step, AdamW) against ``XLNetLMHeadModel`` forward +
   backward + ``torch.optim.AdamW`` with the same perm_mask / target_mapping /
   labels; seconds per step, the ratio and both MFUs (analytic matmul FLOPs x 3
   for forward and backward).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from _common import Reporter, claim_stdout, version

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
QUERY = REPO / "data" / "fetched" / "uniprot20k" / "QUERY.fasta.gz"
SAMPLE = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"
TARGET_VS_PROTTRANS = 1.2


def layer_flops(cfg, rows: int, tokens: int, targets: int = 0) -> float:
    """Matmul FLOPs of one layer's forward on [rows, tokens] (no memory); with
    ``targets`` the query stream too (attention over all positions, as HF)."""
    d, hk, f = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner
    t, r = tokens, 2 * tokens
    attention = 2 * rows * hk * (t * t + t * r + t * t)  # ac, bd, probs @ v
    content = 2 * rows * t * d * hk * 4 + 2 * r * d * hk + attention + 4 * rows * t * d * f
    if not targets:
        return content
    m = targets
    query = (2 * rows * m * d * hk * 2 + 2 * rows * m * t * hk * 2 + attention
             + 4 * rows * m * d * f)
    return content + query


def train_step_comparison(report: Reporter, cfg, hf, rows: int, length: int, steps: int,
                          peak: float) -> dict:
    """One permutation-LM train step, ours against ``hf`` (an ``XLNetLMHeadModel``
    of ``cfg``'s shape), on one batch of the ``uniprot_sample_plm`` task: the
    best of ``steps`` timed steps each (after one untimed), interleaved. Emits
    ``xlnet_train_step/{protlm_jax,hf_torch,vs_hf}``; returns the comparison line."""
    import jax
    import numpy as np
    import torch

    from protlm_jax import objectives_xlnet, optimizers, trainer
    from protlm_jax.data import pipeline as data_pipeline
    from protlm_jax.data import sample
    from protlm_jax.data.vocabularies import ProtXLNetVocabulary
    from protlm_jax.models import build_model
    import protlm_tasks  # noqa: F401  (the uniprot_sample_plm task)

    vocab = ProtXLNetVocabulary()
    m = max(1, round(length * 85 / 512))
    lengths = {"inputs": length, "target_positions": m}
    data_cfg = data_pipeline.DataConfig("uniprot_sample_plm", lengths, pack=False)

    sample_dir = REPO / "data" / "uniprot_sample"
    if not list(sample_dir.glob("train.tfrecord-*")):
        sample.prepare_sample(sample_dir)
    batch = next(data_pipeline.batches(data_cfg, rows, seed=0))
    opt = optimizers.OptimizerConfig(name="adamw", weight_decay=0.01, eps=1e-6,
                                     schedule=optimizers.ScheduleConfig(name="constant",
                                                                        base=1e-4))
    model, init_inputs = build_model(cfg)
    converter = data_pipeline.feature_converter("uniprot_sample_plm", False)
    run = trainer.Trainer(
        model=model, objective=objectives_xlnet.PLMObjective(), optimizer_config=opt,
        config=trainer.TrainConfig(model_dir="/tmp/protlm-bench-xlnet", train_steps=1,
                                   batch_size=rows, seed=0),
        model_feature_lengths=converter.get_model_feature_lengths(lengths),
        init_inputs=init_inputs, devices=jax.devices()[:1])
    state = run.init_state()
    fn = run.train_fn(state)
    global_batch = run._global(batch)

    def ours_step():
        nonlocal state
        state, metrics = fn(state, global_batch)
        jax.block_until_ready(metrics["loss"])

    inputs = objectives_xlnet.model_inputs({k: jax.numpy.asarray(v) for k, v in batch.items()},
                                           vocab.CLS_ID)
    pos = np.maximum(batch["encoder_target_positions"] - 1, 0)
    labels = np.take_along_axis(batch["encoder_input_tokens"], pos, axis=1)
    labels = np.where(batch["encoder_target_positions"] > 0, labels, -100)
    t_inputs = {k: torch.tensor(np.asarray(v)) for k, v in inputs.items()}
    t_inputs["input_ids"] = t_inputs["input_ids"].long()
    t_inputs["token_type_ids"] = t_inputs["token_type_ids"].long()
    t_labels = torch.tensor(labels).long()
    hf.train()
    hf.config.dropout = 0.0
    torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-6)

    def hf_step():
        torch_opt.zero_grad()
        loss = hf(**t_inputs, labels=t_labels).loss
        loss.backward()
        torch_opt.step()

    times = {"ours": [], "hf": []}
    for name, step in (("ours", ours_step), ("hf", hf_step)):
        step()  # compile / warm up
    for _ in range(steps):
        for name, step in (("ours", ours_step), ("hf", hf_step)):
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    flops = 3 * cfg.n_layer * layer_flops(cfg, rows, length, m)
    t_o, t_h = min(times["ours"]), min(times["hf"])
    ctx = {"rows": rows, "length": length, "targets": m, "flops": flops, "peak_flops": peak}
    report.emit("xlnet_train_step/protlm_jax", t_o, "s", seconds_steps=times["ours"],
                mfu=flops / t_o / peak, **ctx)
    report.emit("xlnet_train_step/hf_torch", t_h, "s", seconds_steps=times["hf"],
                mfu=flops / t_h / peak, **ctx)
    return report.emit("xlnet_train_step/vs_hf", t_h / t_o, "x", mfu=flops / t_o / peak,
                       mfu_hf=flops / t_h / peak, **ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=60, help="records embedded")
    parser.add_argument("--layers", type=int, default=2, help="layers of the published width")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds of ours and HF (best of each)")
    parser.add_argument("--train_rows", type=int, default=4)
    parser.add_argument("--train_length", type=int, default=256)
    parser.add_argument("--train_steps", type=int, default=3, help="timed steps (after 1)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 20 records")
    args = parser.parse_args()
    out = claim_stdout()
    wall = time.perf_counter()

    import jax
    import numpy as np
    import torch
    import transformers

    from embed import prottrans_batches, read_records
    from protlm_jax import embed, host_memory, partitioning
    from protlm_jax.data.vocabularies import ProtXLNetVocabulary
    from protlm_jax.hf import xlnet as hf_xlnet
    from protlm_jax.models import xlnet
    from _common import bench_peak
    import protlm_tasks  # noqa: F401  (the uniprot_sample_plm task)

    malloc_tuning = host_memory.retain_freed_memory()
    if args.quick:
        cfg = xlnet.preset("prot_xlnet_tiny")
        args.num, args.train_length = min(args.num, 20), 64
    else:
        cfg = xlnet.preset("prot_xlnet", n_layer=args.layers, dropout=0.0)
    data = QUERY if QUERY.exists() else SAMPLE
    common = {"quick": args.quick, "model": f"xlnet d{cfg.d_model} x{cfg.n_layer}",
              "data": str(data.relative_to(REPO)),
              "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "loadavg_1m_start": round(os.getloadavg()[0], 2),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "malloc_tuning": malloc_tuning},
              "versions": {p: version(p) for p in ("jax", "flax", "torch", "transformers")}}
    report = Reporter(out, common)
    peak = bench_peak(report, 512 if args.quick else 2048, 3 if args.quick else 10)

    # ------------------------------------------------------------- embed ---
    vocab = ProtXLNetVocabulary()
    records = read_records(data, args.num)
    residues = sum(len(s) for _, s in records)
    hf_config = transformers.XLNetConfig(**{k: v for k, v in hf_xlnet.hf_config_dict(
        cfg, "XLNetLMHeadModel").items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    hf = transformers.XLNetLMHeadModel(hf_config)
    params = hf_xlnet.params_from_state_dict(hf.state_dict(), cfg)
    mesh = partitioning.create_mesh(1, devices=jax.devices()[:1])
    embedder = embed.Embedder(cfg, params, vocab, mesh)
    base = hf.transformer.eval()

    hf_batches = prottrans_batches(records)

    def run_ours():
        t = time.perf_counter()
        result = dict(embedder.embed(records))
        return result, time.perf_counter() - t

    def run_hf():
        result = {}
        t = time.perf_counter()
        with torch.no_grad():
            for batch in hf_batches:
                width = max(len(s) for _, s in batch) + 2
                ids = torch.full((len(batch), width), vocab.PAD_ID, dtype=torch.long)
                for r, (_, s) in enumerate(batch):
                    tokens = list(vocab.encode(s)) + [vocab.SEP_ID, vocab.CLS_ID]
                    ids[r, width - len(tokens):] = torch.tensor(tokens)
                hidden = base(input_ids=ids, attention_mask=(ids != vocab.PAD_ID).long()
                              ).last_hidden_state
                for r, (ident, s) in enumerate(batch):
                    result[ident] = hidden[r, width - len(s) - 2:width - 2].numpy()
        return result, time.perf_counter() - t

    ours, t_cold = run_ours()
    t_ours, t_hf = [], []
    for _ in range(args.rounds):
        t_ours.append(run_ours()[1])
        theirs, t = run_hf()
        t_hf.append(t)
    best, base_t = min(t_ours), min(t_hf)
    diff = max(float(np.abs(ours[i] - theirs[i]).max()) for i, _ in records)
    plan = embedder._plan([(i, list(vocab.encode(s)) + [vocab.SEP_ID, vocab.CLS_ID])
                           for i, s in records], 4096)
    flops = sum(cfg.n_layer * layer_flops(cfg, rows, bucket) for bucket, rows, _ in plan)
    ctx = {"records": len(records), "residues": residues, "dtype": "float32"}
    report.emit("xlnet_embed/protlm_jax_cold", residues / t_cold, "residues/s",
                seconds=t_cold, **ctx)
    report.emit("xlnet_embed/protlm_jax", residues / best, "residues/s", seconds=best,
                seconds_rounds=t_ours, mfu_padded=flops / best / peak, batches=len(plan), **ctx)
    report.emit("xlnet_embed/hf_torch_prottrans_batching", residues / base_t, "residues/s",
                seconds=base_t, seconds_rounds=t_hf,
                batches=len(hf_batches), **ctx)
    report.emit("xlnet_embed/vs_hf_prottrans_batching", residues / best, "residues/s",
                baseline=residues / base_t, speedup=base_t / best,
                speedup_cold=base_t / t_cold, target_speedup=TARGET_VS_PROTTRANS,
                meets_speedup=base_t / best >= TARGET_VS_PROTTRANS, max_abs_diff=diff, **ctx)

    # -------------------------------------------------------- train step ---
    train_step_comparison(report, cfg, hf, args.train_rows, args.train_length,
                          args.train_steps, peak)
    report.emit("run/wall", time.perf_counter() - wall, "s")


if __name__ == "__main__":
    sys.exit(main())
