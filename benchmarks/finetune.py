"""LoRA fine-tuning step: protlm-jax vs Hugging Face transformers + peft, same shapes.

Run from the repository root::

    .venv/bin/python benchmarks/finetune.py [--layers 2] [--rows 8] [--length 256] [--quick]

One run measures (JSON lines on stdout, see ``benchmarks/README.md``) one
per-protein fine-tuning step (forward, backward, AdamW update) of a ProtBert-width
encoder (d 1024, 16 heads x 64, d_ff 4096; ``--layers`` of its 30) with LoRA
rank 4, alpha 1 on q, k, v, o, the layer norms and the ProtTrans per-protein
head (mean -> Dense(D, D) -> tanh -> Dense(13)) trainable, on ``--rows`` real
UniProt sequences cropped to ``--length`` tokens:

* ours: ``protlm_jax.finetune.train.Runner``'s jitted step (one device);
* theirs: ``transformers.BertModel`` wrapped by ``peft.get_peft_model``
  (``LoraConfig(r=4, lora_alpha=1, target_modules=query|key|value|
  attention.output.dense, modules_to_save=LayerNorm)``), the same head in
  torch, ``torch.optim.AdamW`` on the trainable parameters;

tokens/s of each (best of ``--rounds`` interleaved rounds) and the ratio.
Both start from the same weights (the HF model imported into ours).
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
SAMPLE = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def lora_step_comparison(report: Reporter, cfg, rows: int, length: int, steps: int,
                         rounds: int, peak: float | None = None) -> dict:
    """One LoRA fine-tuning step (r 4, alpha 1 on q, k, v, o + LayerNorms, a
    13-class protein head) of ours against transformers + peft on the same
    ``BertModel`` weights and batch: the best of ``rounds`` rounds of ``steps``
    steps each, interleaved. Emits ``finetune_lora_step/...``; returns the
    comparison line. With ``peak`` (FLOP/s) the lines carry MFUs: forward +
    input-gradient backward = 2 x the layers' forward matmul FLOPs (frozen
    weights need no weight gradients; the adapters' are negligible)."""
    import jax
    import numpy as np
    import peft
    import torch
    import transformers

    from embed import read_records
    from protlm_jax import models, partitioning
    from protlm_jax.finetune import tasks, train
    from protlm_jax.hf import bert as hf_bert

    # The same weights on both sides.
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    hf_cfg = transformers.BertConfig(**{k: v for k, v in hf_bert.hf_config_dict(
        cfg, "BertModel").items() if k not in ("architectures", "model_type")})
    hf_cfg.hidden_dropout_prob = hf_cfg.attention_probs_dropout_prob = 0.0
    base = transformers.BertModel(hf_cfg, add_pooling_layer=False)
    params = hf_bert.params_from_state_dict(
        {f"bert.{k}": v for k, v in base.state_dict().items()}, cfg, require_head=False)
    fam = models.family_for(cfg)
    view = fam.encoder_view(cfg, params)

    # Real sequences, cropped: [CLS] seq [SEP] of exactly --length tokens.
    records = [(i, s[:length - 2]) for i, s in read_records(SAMPLE, 400)
               if len(s) >= length - 2][:rows]
    classes = tuple(f"c{i}" for i in range(13))
    split = tasks.Split([i for i, _ in records], [s for _, s in records],
                        {"label": [k % 13 for k in range(len(records))]},
                        {"label": [1.0] * len(records)})
    task = tasks.Task("bench", "protein", (tasks.Output("label", classes),), split, split, {})
    mesh = partitioning.create_mesh(1, devices=jax.devices()[:1])
    rules = partitioning.standard_logical_axis_rules("1d")
    model = train.build(fam, view, task, train.FinetuneConfig(
        method="lora", batch_size=rows, dropout=0.0), mesh, rules)
    tok = train.Tokens(fam, fam.vocabulary(), view.max_positions)
    enc = tok.encode(split)
    batch = train.make_batch(enc, list(range(len(records))), rows, model)
    tokens_np = batch["tokens"]
    runner = train.Runner(model, view.params)
    trainable, opt_state = runner.init(0)
    fn = runner.train_step()
    placed = runner.put(batch)

    # Theirs: peft on BertModel + the same head in torch.
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=1, lora_dropout=0.0,
                               target_modules=r".*attention\.(self\.(query|key|value)|output\.dense)",
                               modules_to_save=["LayerNorm"])
    pm = peft.get_peft_model(base, lora_cfg)
    d = cfg.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, 13))
    trainable_t = [p for p in pm.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(trainable_t, lr=3e-4, weight_decay=0.0)
    ids_t = torch.tensor(tokens_np.astype(np.int64))
    mask_t = ids_t != 0
    labels_t = torch.tensor(batch["y_label"].astype(np.int64))

    def hf_step():
        opt.zero_grad()
        h = pm(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        pooled = h[:, 1:-1].mean(1)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels_t)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def ours_steps(n):
        nonlocal trainable, opt_state
        for i in range(n):
            trainable, opt_state, s = fn(trainable, opt_state, runner.frozen_arg(), placed,
                                         jax.random.key(i))
        jax.block_until_ready(s)

    t0 = time.perf_counter()
    ours_steps(1)
    compile_s = time.perf_counter() - t0
    hf_step()
    times = {"ours": [], "hf": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        ours_steps(steps)
        times["ours"].append((time.perf_counter() - t0) / steps)
        t0 = time.perf_counter()
        for _ in range(steps):
            hf_step()
        times["hf"].append((time.perf_counter() - t0) / steps)
    tokens = tokens_np.size
    t_o, t_h = min(times["ours"]), min(times["hf"])
    counts = train.trainable_count(model)
    d, f = cfg.hidden_size, cfg.intermediate_size
    flops = 2.0 * cfg.num_hidden_layers * (2 * tokens * (4 * d * d + 2 * d * f)
                                           + 4 * rows * length * length * d)

    def mfu(seconds):
        return {"mfu": flops / seconds / peak, "flops": flops, "peak_flops": peak} if peak else {}

    report.emit("finetune_lora_step/protlm_jax", tokens / t_o, "tokens/s", seconds=t_o,
                compile_seconds=compile_s, trainable=counts, **mfu(t_o))
    report.emit("finetune_lora_step/hf_peft", tokens / t_h, "tokens/s", seconds=t_h,
                trainable=sum(p.numel() for p in trainable_t), **mfu(t_h))
    return report.emit("finetune_lora_step/vs_hf_peft", t_h / t_o, "x",
                       **({"mfu": flops / t_o / peak, "mfu_baseline": flops / t_h / peak}
                          if peak else {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny width, short rows")
    args = parser.parse_args()
    out = claim_stdout()
    wall = time.perf_counter()

    from protlm_jax.models import bert

    if args.quick:
        cfg = bert.preset("prot_bert_tiny")
        args.length = min(args.length, 64)
    else:
        cfg = bert.preset("prot_bert", num_hidden_layers=args.layers,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    common = {"quick": args.quick, "model": f"bert d{cfg.hidden_size} x{cfg.num_hidden_layers}",
              "rows": args.rows, "length": args.length, "lora": "r4 alpha1 q,k,v,o + norms",
              "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "loadavg_1m_start": round(os.getloadavg()[0], 2)},
              "versions": {p: version(p) for p in ("jax", "flax", "torch", "transformers",
                                                   "peft")}}
    report = Reporter(out, common)

    lora_step_comparison(report, cfg, args.rows, args.length, args.steps, args.rounds)
    report.emit("run/wall", time.perf_counter() - wall, "s")


if __name__ == "__main__":
    main()
