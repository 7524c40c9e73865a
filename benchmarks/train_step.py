"""Training-step throughput of protlm-jax T5 against Hugging Face T5 on torch.

Run from the repository root::

    .venv/bin/python benchmarks/train_step.py [--steps N] [--batch B] [--length L]
        [--models prot_t5_small,prot_t5_base] [--bf16] [--quick]

Measured in one run, on one machine state, so every comparison line compares
numbers taken minutes apart:

1. The machine's float32 matmul peak: a jitted ``jnp.dot`` and ``torch.mm`` of
   two 2048×2048 float32 matrices (best of N); the larger is ``peak_flops``,
   the denominator of every MFU figure.
2. One ``protlm_jax.trainer.Trainer`` train step (built as
   ``tests/test_trainer.py::_trainer`` does, on one device, AdamW, constant
   learning rate 1e-4, dropout 0) on a batch of real UniProt sequences with
   ProtT5 masking: steps/s, target tokens/s, FLOPs per step (XLA's cost
   analysis and an analytic count) and MFU.
3. The baseline: ``transformers.T5ForConditionalGeneration`` of the same
   shape, float32, torch CPU with all threads, ``torch.optim.AdamW(lr=1e-4)``,
   forward + backward + step on the same batch, and a comparison line.

Output: one JSON object per line on stdout and nothing else (progress and the
libraries' chatter go to stderr). ``benchmarks/README.md`` says what each line
means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import Reporter, bench_peak, claim_stdout, version

# Before jax / TensorFlow are imported. A caller's XLA_FLAGS are kept as they
# are; none are added otherwise (in particular no simulated device count: the
# step is measured on the one real CPU device).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"
NOISE_DENSITY = 0.15      # ProtT5: each masked residue becomes its own sentinel
WARMUP_STEPS = 2          # untimed; the first one compiles
PEAK_SIZE = 2048
PEAK_REPEATS = 10
LEARNING_RATE = 1e-4
TARGET_SPEEDUP = 1.0      # the targets (parity; 1.3 was set too high)
TARGET_MFU = 0.45
# prot_t5_base costs ~4.5x prot_t5_small per step (minutes per step on two
# cores), so it is opt-in: --models prot_t5_small,prot_t5_base, with fewer
# timed steps (see --base-steps).
DEFAULT_MODELS = "prot_t5_small"
# Models beyond the presets: an XL-width slice for the GPU check (4 + 4 layers
# at ProtT5-XL width), see benchmarks/gpu_train.sh.
EXTRA_MODELS = {"prot_t5_xl_slice": ("prot_t5_xl_uniref50",
                                     {"num_encoder_layers": 4, "num_decoder_layers": 4})}


def model_config(name: str, **overrides):
    """A preset, or one of EXTRA_MODELS, with ``overrides``."""
    from protlm_jax.models import t5

    base, extra = EXTRA_MODELS.get(name, (name, {}))
    return t5.preset(base, **extra, **overrides)
DEFAULT_BASE_STEPS = 2
# --quick keeps the 2 warm-up steps: the second call of the jitted step still
# compiles once more (the donated output state's layout differs from init's).
DEFAULT_BERT_LAYERS = 4
QUICK = {"steps": 3, "batch": 2, "length": 64, "models": "prot_t5_tiny", "bert_layers": 2,
         "xlnet_layers": 1, "lora_layers": 1,
         "peak_size": 512, "warmup": WARMUP_STEPS}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- the batch ---

def make_batch(batch: int, length: int, seed: int = 0) -> dict:
    """A ProtT5 denoising batch of real sequences, unpacked, ``[batch, length]``.

    The first ``batch`` records of the committed sample, each cropped to
    ``length - 1`` residues plus EOS (shorter ones padded with 0). Targets are
    the residues; inputs replace ``round(0.15 n)`` residues (at least 1, at most
    100 and n - 1) by their own sentinel, ``<extra_id_0>`` = 127 first, as
    ``preprocessors.prott5_denoise`` does; decoder inputs are the targets
    shifted right after the start id 0; loss weights are ``targets != 0``.
    """
    import numpy as np

    from protlm_jax.data import fasta
    from protlm_jax.data.vocabularies import ProtT5Vocabulary

    vocab = ProtT5Vocabulary()
    rng = np.random.default_rng(seed)
    targets = np.zeros((batch, length), np.int32)
    inputs = np.zeros((batch, length), np.int32)
    records = fasta.read_fasta(str(SAMPLE))
    for row in range(batch):
        ids = np.asarray(vocab.encode(next(records).sequence), np.int32)[:length - 1]
        n = len(ids)
        count = int(np.clip(round(n * NOISE_DENSITY), min(1, n - 1),
                            min(n - 1, vocab.extra_ids))) if n >= 2 else 0
        masked = ids.copy()
        if count:
            chosen = np.sort(rng.choice(n, size=count, replace=False))
            masked[chosen] = vocab.vocab_size - 1 - np.arange(count)
        targets[row, :n], targets[row, n] = ids, vocab.eos_id
        inputs[row, :n], inputs[row, n] = masked, vocab.eos_id
    decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], 1)
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets != 0).astype(np.int32)}


# ------------------------------------------------------------------- FLOPs ---

def analytic_flops(config, batch: int, enc_len: int, dec_len: int) -> dict:
    """Model FLOPs of one training step (forward + backward = 3 × forward).

    Matmul parameters count ``2 × params × tokens`` forward: the encoder's on
    encoder token slots, the decoder's (and the tied LM head, V × D) on
    decoder slots. Attention adds ``2 × 2 × T × S × H·K`` per row and layer
    forward (scores and the weighted sum): encoder self (L, L), decoder self
    (T, T, causal but computed in full, as both implementations do) and cross
    (T, L). Padding slots are computed, so they count. Element-wise work, norms
    and the optimizer update are left out (they are in XLA's figure).
    """
    d, f, hk, v = config.d_model, config.d_ff, config.num_heads * config.d_kv, config.vocab_size
    gated = config.feed_forward_proj != "relu"
    mlp = d * f * (3 if gated else 2)
    enc_params = config.num_encoder_layers * (4 * d * hk + mlp)
    dec_params = config.num_decoder_layers * (8 * d * hk + mlp) + v * d
    enc_tokens, dec_tokens = batch * enc_len, batch * dec_len
    dense = 6 * (enc_params * enc_tokens + dec_params * dec_tokens)
    attn_fwd = 4 * batch * hk * (config.num_encoder_layers * enc_len * enc_len
                                 + config.num_decoder_layers * (dec_len * dec_len
                                                                + dec_len * enc_len))
    return {"total": float(dense + 3 * attn_fwd), "dense": float(dense),
            "attention": float(3 * attn_fwd), "encoder_matmul_params": enc_params,
            "decoder_matmul_params": dec_params}


# -------------------------------------------------------------- protlm-jax ---

def _interleaved(sides: dict, warmup: int, steps: int) -> dict:
    """Times the sides' steps in turns, so both see the same machine state.

    ``sides`` maps a name to a synchronous step. Each side first runs its
    ``warmup`` steps (ours compiles there), then the timed steps alternate:
    A, B, A, B, ... Returns per side ``warmup_s``, ``step_s`` and ``cpu_util``:
    this process's CPU time (all threads) over the wall time of that side's
    timed steps, about ``os.cpu_count()`` when the step keeps every core busy,
    lower when it runs serial parts or other jobs take the cores.
    """
    out = {}
    for side, step in sides.items():
        warm = []
        for _ in range(warmup):
            t = time.perf_counter()
            step()
            warm.append(time.perf_counter() - t)
        out[side] = {"warmup_s": warm, "step_s": [], "cpu_s": 0.0}
    for _ in range(steps):
        for side, step in sides.items():
            c, t = time.process_time(), time.perf_counter()
            step()
            out[side]["step_s"].append(time.perf_counter() - t)
            out[side]["cpu_s"] += time.process_time() - c
    for timing in out.values():
        timing["cpu_util"] = timing.pop("cpu_s") / sum(timing["step_s"])
    return out


def _rates(timing: dict, tokens: int, slots: int, flops: float, peak: float) -> dict:
    """Rates from the median timed step (robust to one disturbed step)."""
    median = statistics.median(timing["step_s"])
    return {"steps_per_s": 1.0 / median, "tokens_per_s": tokens / median,
            "token_slots_per_s": slots / median, "step_s_median": median,
            "step_s_min": min(timing["step_s"]),
            "step_s_mean": statistics.fmean(timing["step_s"]),
            "cpu_util": timing["cpu_util"], "mfu": flops / median / peak,
            "steps": len(timing["step_s"]), "warmup_steps": len(timing["warmup_s"]),
            "step_s": timing["step_s"],
            "first_step_s": timing["warmup_s"][0] if timing["warmup_s"] else None}


def build_ours(name: str, batch_np: dict, model_dir: str, *, dtype: str = "float32",
               optimizer: str = "adamw"):
    """Our jitted train step, as ``(trainer, state, step_fn, device batch)``.

    A ``trainer.Trainer`` built as ``tests/test_trainer.py::_trainer`` does, on
    one device, constant learning rate 1e-4, dropout 0.
    """
    import jax
    import seqio

    from protlm_jax import objectives, optimizers, trainer
    from protlm_jax.models import t5

    batch, length = batch_np["decoder_target_tokens"].shape
    config = model_config(name, dropout_rate=0.0, dtype=dtype)
    lengths = {"inputs": length, "targets": length}
    converter = seqio.EncDecFeatureConverter(pack=False)
    opt = optimizers.OptimizerConfig(
        name=optimizer,
        schedule=optimizers.ScheduleConfig(name="constant", base=LEARNING_RATE))
    run = trainer.Trainer(
        model=t5.T5(config), objective=objectives.EncDecObjective(), optimizer_config=opt,
        config=trainer.TrainConfig(model_dir=model_dir, train_steps=1000,
                                   batch_size=batch, seed=1),
        model_feature_lengths=converter.get_model_feature_lengths(lengths),
        init_inputs=("encoder_input_tokens", "decoder_input_tokens"),
        devices=jax.devices()[:1])
    state = run.init_state()
    return run, state, run.train_fn(state), run._global(batch_np)


def prepare_ours(report: Reporter, name: str, batch_np: dict, model_dir: str, *,
                 peak: float, dtype: str = "float32"):
    """Our T5 step and ``finish(timing)``, which emits its line."""
    import jax
    import numpy as np

    batch, length = batch_np["decoder_target_tokens"].shape
    config = model_config(name, dropout_rate=0.0, dtype=dtype)
    run, state, fn, gbatch = build_ours(name, batch_np, model_dir, dtype=dtype)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    t = time.perf_counter()
    xla_flops = run.step_flops(state)   # lowers (traces) but does not compile
    lower_s = time.perf_counter() - t
    holder = {"state": state}
    metrics = []

    def step():
        holder["state"], m = fn(holder["state"], gbatch)
        jax.block_until_ready((holder["state"], m))
        metrics.append(m)

    def finish(timing: dict) -> dict:
        first, last = jax.device_get(metrics[0]), jax.device_get(metrics[-1])
        tokens = int(batch_np["decoder_loss_weights"].sum())
        analytic = analytic_flops(config, batch, length, length)
        rates = _rates(timing, tokens, batch * length, analytic["total"], peak)
        return report.emit(
            f"train_step/{name}/protlm_jax" + ("" if dtype == "float32" else f"_{dtype}"),
            rates["tokens_per_s"], "tokens/s", model=name, dtype=dtype, batch=batch,
            length=length, params=params, target_tokens_per_step=tokens, **rates,
            flops_per_step_xla=xla_flops, flops_per_step_analytic=analytic["total"],
            flops_analytic_dense=analytic["dense"],
            flops_analytic_attention=analytic["attention"],
            mfu_xla=xla_flops / rates["step_s_median"] / peak if xla_flops else None,
            peak_flops=peak, lower_s=lower_s,
            loss_first=float(first["loss"]) / float(first["weight"]),
            loss_last=float(last["loss"]) / float(last["weight"]),
            nonfinite=float(last["nonfinite"]), optimizer="adamw", devices=1)

    return step, finish


# ---------------------------------------------------------- Hugging Face ---

def build_hf(name: str, batch_np: dict, optimizer: str = "adamw"):
    """The baseline step: ``(model, step)``; ``step(parts=None)`` runs zero_grad,
    forward, backward and the optimizer update and returns the loss. ``parts``
    (a context-manager factory, e.g. ``torch.profiler.record_function``) marks
    the phases "forward", "backward" and "optimizer"."""
    import contextlib

    import torch
    import transformers

    from protlm_jax.hf.t5 import hf_config_from_t5config

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = model_config(name, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(hf_config_from_t5config(config))
    model = model.float().train()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    else:  # transformers' Adafactor with T5X's settings (relative step off)
        opt = transformers.optimization.Adafactor(
            model.parameters(), lr=LEARNING_RATE, decay_rate=-0.8, clip_threshold=1.0,
            scale_parameter=True, relative_step=False, warmup_init=False)
    enc = torch.from_numpy(batch_np["encoder_input_tokens"]).long()
    dec = torch.from_numpy(batch_np["decoder_input_tokens"]).long()
    labels = torch.from_numpy(batch_np["decoder_target_tokens"]).long()
    labels = labels.masked_fill(labels == 0, -100)
    attention_mask = (enc != 0).long()

    def step(parts=None):
        mark = parts or (lambda _: contextlib.nullcontext())
        with mark("optimizer"):
            opt.zero_grad(set_to_none=True)
        with mark("forward"):
            out = model(input_ids=enc, attention_mask=attention_mask,
                        decoder_input_ids=dec, labels=labels)
        with mark("backward"):
            out.loss.backward()
        with mark("optimizer"):
            opt.step()
        return float(out.loss.detach())

    return model, step


def prepare_hf(report: Reporter, name: str, batch_np: dict, *, peak: float):
    """The Hugging Face T5 step and ``finish(timing)``, which emits its line."""
    import torch

    batch, length = batch_np["decoder_target_tokens"].shape
    config = model_config(name, dropout_rate=0.0)
    model, hf_step = build_hf(name, batch_np)
    params = sum(p.numel() for p in model.parameters())
    losses = []

    def finish(timing: dict) -> dict:
        tokens = int(batch_np["decoder_loss_weights"].sum())
        analytic = analytic_flops(config, batch, length, length)
        rates = _rates(timing, tokens, batch * length, analytic["total"], peak)
        return report.emit(
            f"train_step/{name}/hf_torch", rates["tokens_per_s"], "tokens/s", model=name,
            dtype="float32", batch=batch, length=length, params=params,
            target_tokens_per_step=tokens, **rates,
            flops_per_step_analytic=analytic["total"], peak_flops=peak,
            loss_first=losses[0], loss_last=losses[-1], optimizer="torch.optim.AdamW",
            torch_threads=torch.get_num_threads(),
            attn_implementation=getattr(model.config, "_attn_implementation", None))

    return lambda: losses.append(hf_step()), finish


def _ours_alone(name: str, batch: int, length: int, warmup: int, steps: int) -> dict:
    """Our step alone in this process: per timed step its wall seconds, minor
    page faults and kernel (system) CPU seconds (``--child-ours``)."""
    import resource

    import jax

    batch_np = make_batch(batch, length)
    with tempfile.TemporaryDirectory(prefix="protlm-bench-") as model_dir:
        _, state, fn, gbatch = build_ours(name, batch_np, model_dir)
        out = {"step_s": [], "minflt": [], "stime_s": []}
        for i in range(warmup + steps):
            r, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            state, m = fn(state, gbatch)
            jax.block_until_ready((state, m))
            wall, r2 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            if i >= warmup:
                out["step_s"].append(wall)
                out["minflt"].append(r2.ru_minflt - r.ru_minflt)
                out["stime_s"].append(r2.ru_stime - r.ru_stime)
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    return out


def bench_allocator(report: Reporter, name: str, pairs: int, *, batch: int, length: int,
                    warmup: int, steps: int) -> dict:
    """Before/after of the allocator environment, in alternating child processes.

    ``before``: what the Trainer alone sets (mallopt; no restart, so no
    ``GLIBC_TUNABLES``); ``after``: the environment ``host_memory.reexec_tuned``
    restarts the program under (what ``protlm`` and this script run with).
    Each child runs ``_ours_alone``; the value is the median over the pairs'
    timed steps.
    """
    import json
    import subprocess

    from protlm_jax import host_memory

    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    envs = {"before": dict(plain, PROTLM_MALLOC_REEXEC="1"),
            "after": host_memory.tuned_environ(plain) or plain}
    got = {side: {"step_s": [], "minflt": [], "stime_s": []} for side in envs}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-ours", name,
           "--batch", str(batch), "--length", str(length), "--warmup", str(warmup),
           "--steps", str(steps)]
    for pair in range(pairs):
        for side, env in envs.items():
            log(f"  allocator {side}, pair {pair + 1}/{pairs}")
            line = subprocess.run(cmd, env=env, check=True, text=True,
                                  stdout=subprocess.PIPE).stdout.strip().splitlines()[-1]
            for key, values in json.loads(line).items():
                if key in got[side]:
                    got[side][key] += values
    med = {side: {k: statistics.median(v) for k, v in g.items()} for side, g in got.items()}
    return report.emit(
        f"variant/{name}/allocator", med["after"]["step_s"], "s", model=name,
        baseline=med["before"]["step_s"], speedup=med["before"]["step_s"] / med["after"]["step_s"],
        minflt_per_step=med["after"]["minflt"], minflt_per_step_baseline=med["before"]["minflt"],
        stime_s=med["after"]["stime_s"], stime_s_baseline=med["before"]["stime_s"],
        step_s=got["after"]["step_s"], step_s_baseline=got["before"]["step_s"],
        glibc_tunables=envs["after"].get("GLIBC_TUNABLES", ""), pairs=pairs,
        batch=batch, length=length)


def compare(report: Reporter, name: str, ours: dict, hf: dict) -> None:
    speedup = ours["value"] / hf["value"]
    report.emit(f"train_step/{name}/vs_hf", ours["value"], "tokens/s", model=name,
                baseline=hf["value"], speedup=speedup, target_speedup=TARGET_SPEEDUP,
                mfu=ours["mfu"], mfu_baseline=hf["mfu"], target_mfu=TARGET_MFU,
                meets_speedup=speedup >= TARGET_SPEEDUP, meets_mfu=ours["mfu"] >= TARGET_MFU)


# ------------------------------------------------------------ ProtBert MLM ---

# ProtBert's width (1024, 16 heads x 64, intermediate 4096, vocab 30) with
# --bert-layers of its 30 layers: the full model is ~10 TFLOP per B=8 x 512
# step, minutes on two cores.
BERT_MASK_RATE = 0.15     # BERT: 15 % of residues scored, 80/10/10 mask/random/keep


def bert_config(layers: int, tiny: bool = False):
    from protlm_jax.models import bert

    return bert.preset("prot_bert_tiny" if tiny else "prot_bert", num_hidden_layers=layers,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_mlm_batch(batch: int, length: int, seed: int = 0) -> dict:
    """A ProtBert MLM batch of real sequences: ``[CLS] residues [SEP]``, padded.

    The first ``batch`` records of the committed sample, cropped to
    ``length - 2`` residues. 15 % of the residues (at least 1) are scored:
    80 % become ``[MASK]``, 10 % a random residue, 10 % stay, chosen with
    ``numpy.random.default_rng(seed)``; targets are the original ids, loss
    weights 1 at the scored positions.
    """
    import numpy as np

    from protlm_jax.data import fasta
    from protlm_jax.data.vocabularies import ProtBertVocabulary

    vocab = ProtBertVocabulary()
    rng = np.random.default_rng(seed)
    targets = np.zeros((batch, length), np.int32)
    weights = np.zeros((batch, length), np.int32)
    records = fasta.read_fasta(str(SAMPLE))
    first_residue = vocab.MASK_ID + 1
    for row in range(batch):
        ids = np.asarray(vocab.encode(next(records).sequence), np.int32)[:length - 2]
        n = len(ids)
        targets[row, :n + 2] = [vocab.CLS_ID, *ids, vocab.SEP_ID]
        chosen = 1 + rng.choice(n, size=max(1, round(n * BERT_MASK_RATE)), replace=False)
        weights[row, chosen] = 1
    inputs = targets.copy()
    roll = rng.random(targets.shape)
    scored = weights == 1
    inputs[scored & (roll < 0.8)] = vocab.MASK_ID
    random_ids = rng.integers(first_residue, vocab.vocab_size, targets.shape)
    swap = scored & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_ids[swap]
    return {"encoder_input_tokens": inputs, "encoder_target_tokens": targets,
            "encoder_loss_weights": weights}


def bert_flops(config, batch: int, length: int) -> float:
    """Matmul FLOPs of one MLM step (3 x forward): the layers' projections,
    attention (scores and weighted sum) and the MLM head (dense + tied decoder
    over the vocabulary) on every one of the B x L slots, as both sides run."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    tokens = batch * length
    layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * batch * length * length * d
    head = 2 * tokens * (d * d + d * v)
    return 3.0 * (config.num_hidden_layers * layer + head)


def build_ours_bert(config, batch_np: dict, model_dir: str):
    """Our MLM train step with LAMB (weight decay 0.01, the BERT recipe)."""
    import jax

    from protlm_jax import models, objectives_ae, optimizers, trainer

    batch, length = batch_np["encoder_input_tokens"].shape
    module, init_inputs = models.family_for(config).build(config)
    opt = optimizers.OptimizerConfig(
        name="lamb", weight_decay=0.01, eps=1e-6,
        schedule=optimizers.ScheduleConfig(name="constant", base=LEARNING_RATE))
    run = trainer.Trainer(
        model=module, objective=objectives_ae.MLMObjective(), optimizer_config=opt,
        config=trainer.TrainConfig(model_dir=model_dir, train_steps=1000,
                                   batch_size=batch, seed=1),
        model_feature_lengths={k: length for k in batch_np}, init_inputs=init_inputs,
        devices=jax.devices()[:1])
    state = run.init_state()
    return run, state, run.train_fn(state), run._global(batch_np)


def torch_lamb(params, lr: float, weight_decay: float = 0.01, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-6):
    """LAMB for the torch baseline (torch and transformers have none), as optax
    defines it: Adam moments with bias correction, decoupled weight decay on
    matrices, then the layer-wise trust ratio ||p|| / ||update|| (1 where
    either norm is 0). ``torch._foreach_*`` ops, as torch's own AdamW uses.
    Returns ``step()``."""
    import torch

    params = [p for p in params if p.requires_grad]
    mu = [torch.zeros_like(p) for p in params]
    nu = [torch.zeros_like(p) for p in params]
    decay = [p.ndim >= 2 for p in params]
    count = [0]

    @torch.no_grad()
    def step():
        count[0] += 1
        grads = [p.grad for p in params]
        torch._foreach_lerp_(mu, grads, 1 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, grads, grads, value=1 - b2)
        c1, c2 = 1 - b1 ** count[0], 1 - b2 ** count[0]
        denom = torch._foreach_sqrt(torch._foreach_div(nu, c2))
        torch._foreach_add_(denom, eps)
        updates = torch._foreach_div(torch._foreach_div(mu, c1), denom)
        for u, p, d in zip(updates, params, decay):
            if d:
                u.add_(p, alpha=weight_decay)
        p_norm = torch._foreach_norm(params)
        u_norm = torch._foreach_norm(updates)
        for u, p, pn, un in zip(updates, params, p_norm, u_norm):
            ratio = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
            p.add_(u * ratio, alpha=-lr)

    return step


def build_hf_bert(config, batch_np: dict):
    """``BertForMaskedLM`` of the same shape, float32, LAMB: ``(model, step)``."""
    import contextlib

    import numpy as np
    import torch
    import transformers

    from protlm_jax.hf import bert as hf_bert

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**{k: v for k, v in hf_bert.hf_config_dict(
        config, "BertForMaskedLM").items() if k not in ("architectures", "model_type")})
    model = transformers.BertForMaskedLM(hf_cfg).float().train()
    lamb = torch_lamb(model.parameters(), LEARNING_RATE)
    ids = torch.from_numpy(batch_np["encoder_input_tokens"]).long()
    labels = torch.from_numpy(np.where(batch_np["encoder_loss_weights"] > 0,
                                       batch_np["encoder_target_tokens"], -100)).long()
    attention_mask = (ids != 0).long()

    def step(parts=None):
        mark = parts or (lambda _: contextlib.nullcontext())
        with mark("optimizer"):
            model.zero_grad(set_to_none=True)
        with mark("forward"):
            loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
        with mark("backward"):
            loss.backward()
        with mark("optimizer"):
            lamb()
        return float(loss.detach())

    return model, step


def bench_bert(report: Reporter, layers: int, batch: int, length: int, *, steps: int,
               warmup: int, peak: float, hf: bool = True, tiny: bool = False) -> None:
    """ProtBert MLM + LAMB: ours against ``BertForMaskedLM``, one comparison line."""
    import jax

    name = f"prot_bert{'_tiny' if tiny else ''}_{layers}l"
    config = bert_config(layers, tiny)
    batch_np = make_mlm_batch(batch, length)
    tokens = int(batch_np["encoder_loss_weights"].sum())
    flops = bert_flops(config, batch, length)
    context = dict(model=name, layers=layers, batch=batch, length=length,
                   scored_tokens_per_step=tokens,
                   flops_per_step_analytic=flops, peak_flops=peak, optimizer="lamb")
    log(f"{name}: protlm-jax" + (" and BertForMaskedLM" if hf else "")
        + f", {warmup} warm-up + {steps} steps each, interleaved")
    with tempfile.TemporaryDirectory(prefix="protlm-bench-") as model_dir:
        run, state, fn, gbatch = build_ours_bert(config, batch_np, model_dir)
        holder, metrics, losses = {"state": state}, [], []

        def ours_step():
            holder["state"], m = fn(holder["state"], gbatch)
            jax.block_until_ready((holder["state"], m))
            metrics.append(m)

        sides = {"protlm_jax": ours_step}
        if hf:
            _, hf_step = build_hf_bert(config, batch_np)
            sides["hf_torch"] = lambda: losses.append(hf_step())
        timing = _interleaved(sides, warmup, steps)
        first, last = jax.device_get(metrics[0]), jax.device_get(metrics[-1])
    rates = _rates(timing["protlm_jax"], tokens, batch * length, flops, peak)
    ours = report.emit(f"train_step/{name}/protlm_jax", rates["tokens_per_s"], "tokens/s",
                       **context, **rates,
                       loss_first=float(first["loss"]) / float(first["weight"]),
                       loss_last=float(last["loss"]) / float(last["weight"]))
    log(f"  ours {ours['value']:.0f} scored tokens/s, MFU {ours['mfu']:.3f}")
    if not hf:
        return
    rates = _rates(timing["hf_torch"], tokens, batch * length, flops, peak)
    theirs = report.emit(f"train_step/{name}/hf_torch", rates["tokens_per_s"], "tokens/s",
                         **context, **rates, loss_first=losses[0], loss_last=losses[-1],
                         baseline_optimizer="torch_lamb (foreach)")
    log(f"  HF {theirs['value']:.0f} scored tokens/s, MFU {theirs['mfu']:.3f}")
    compare(report, name, ours, theirs)


# ------------------------------------------------------- XLNet and LoRA ---

def bench_xlnet(report: Reporter, layers: int, peak: float, tiny: bool = False) -> dict:
    """ProtXLNet's permutation-LM step against ``XLNetLMHeadModel`` (AdamW), at
    ProtXLNet's width with ``layers`` of its 30 layers, 4 rows x 256: the
    comparison ``benchmarks/xlnet.py`` makes, lines ``xlnet_train_step/...``."""
    import torch
    import transformers

    import xlnet as xlnet_bench
    from protlm_jax.hf import xlnet as hf_xlnet
    from protlm_jax.models import xlnet

    cfg = (xlnet.preset("prot_xlnet_tiny") if tiny
           else xlnet.preset("prot_xlnet", n_layer=layers, dropout=0.0))
    hf_config = transformers.XLNetConfig(**{k: v for k, v in hf_xlnet.hf_config_dict(
        cfg, "XLNetLMHeadModel").items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    hf = transformers.XLNetLMHeadModel(hf_config)
    rows, length = (2, 64) if tiny else (4, 256)
    log(f"ProtXLNet ({cfg.n_layer} layers): ours and XLNetLMHeadModel, interleaved")
    return xlnet_bench.train_step_comparison(report, cfg, hf, rows, length, 3, peak)


def bench_lora(report: Reporter, layers: int, peak: float, tiny: bool = False) -> dict:
    """The LoRA fine-tuning step against transformers + peft, at ProtBert's
    width with ``layers`` layers, 8 rows x 256: the comparison
    ``benchmarks/finetune.py`` makes, lines ``finetune_lora_step/...``."""
    import finetune as finetune_bench
    from protlm_jax.models import bert

    cfg = (bert.preset("prot_bert_tiny") if tiny
           else bert.preset("prot_bert", num_hidden_layers=layers, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0))
    length = 64 if tiny else 256
    log(f"LoRA ({cfg.num_hidden_layers} layers): ours and transformers + peft, interleaved")
    return finetune_bench.lora_step_comparison(report, cfg, 8, length, 3, 2, peak)


# -------------------------------------------------------------------- main ---

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per model after the warm-up steps (default 3; "
                             f"{QUICK['steps']} with --quick)")
    parser.add_argument("--base-steps", type=int, default=DEFAULT_BASE_STEPS,
                        help="timed steps for prot_t5_base and larger presets "
                             f"(default {DEFAULT_BASE_STEPS}, at most --steps)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first (default {WARMUP_STEPS}; "
                             f"{QUICK['warmup']} with --quick)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"rows per step (default 8; {QUICK['batch']} with --quick)")
    parser.add_argument("--length", type=int, default=None,
                        help="inputs and targets length, EOS included (default 512; "
                             f"{QUICK['length']} with --quick)")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated T5 presets (default {DEFAULT_MODELS}; "
                             f"{QUICK['models']} with --quick)")
    parser.add_argument("--bert-layers", type=int, default=None,
                        help="also ProtBert MLM + LAMB against BertForMaskedLM at ProtBert width "
                             "with this many of its 30 layers (0: skip; default "
                             f"{DEFAULT_BERT_LAYERS}; 2 at tiny width with --quick)")
    parser.add_argument("--xlnet-layers", type=int, default=None,
                        help="also ProtXLNet against XLNetLMHeadModel with this many layers "
                             "(0: skip, the default; tiny with --quick)")
    parser.add_argument("--lora-layers", type=int, default=None,
                        help="also the LoRA step against transformers + peft on ProtBert with "
                             "this many layers (0: skip, the default; tiny with --quick)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run ours with bfloat16 activations (first model only)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    parser.add_argument("--peak_flops", type=float, default=None,
                        help="peak FLOP/s per device for MFU (default: the measured "
                        "float32 matmul peak; on a GPU give the card's bf16 peak)")
    parser.add_argument("--allocator-ab", type=int, default=0, metavar="PAIRS",
                        help="also time our step (first model) alone in PAIRS of child "
                             "processes without / with the allocator environment "
                             "(variant/MODEL/allocator; 0: skip, the default)")
    parser.add_argument("--child-ours", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny model and batch (< 60 s); figures not comparable")
    args = parser.parse_args(argv)
    from protlm_jax import host_memory

    # First, before threads or heavy imports: restart under the allocator
    # environment the protlm command uses (unless asked not to).
    host_memory.reexec_tuned()

    def pick(value, quick_key, default):
        if value is not None:
            return value
        return QUICK[quick_key] if args.quick else default

    steps = pick(args.steps, "steps", 3)
    warmup = pick(args.warmup, "warmup", WARMUP_STEPS)
    batch = pick(args.batch, "batch", 8)
    length = pick(args.length, "length", 512)
    models = [m for m in pick(args.models, "models", DEFAULT_MODELS).split(",") if m]
    if steps < 1 or warmup < 0 or batch < 1 or length < 2:
        parser.error("--steps ≥ 1, --warmup ≥ 0, --batch ≥ 1 and --length ≥ 2 are required")

    json_out = claim_stdout()
    if args.child_ours:
        json_out.write(json.dumps(_ours_alone(args.child_ours, batch, length, warmup, steps))
                       + "\n")
        return 0
    t_start = time.perf_counter()
    loadavg_start = os.getloadavg()
    import jax  # noqa: E402  (after the environment is fixed)
    import torch  # noqa: E402

    # The allocator setting the Trainer makes, made before anything is
    # measured: the peak, ours and the torch baseline all run under it.
    malloc_tuning = host_memory.retain_freed_memory()
    common = {
        "quick": args.quick,
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                 "machine": platform.machine(), "processor": _cpu_name(),
                 "loadavg_1m": round(loadavg_start[0], 2),
                 "loadavg_5m": round(loadavg_start[1], 2),
                 "jax_devices": [str(d) for d in jax.devices()],
                 "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "malloc_tuning": malloc_tuning,
                 "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
        "versions": {name: version(pkg) for name, pkg in (
            ("protlm_jax", "protlm-jax"), ("jax", "jax"), ("jaxlib", "jaxlib"),
            ("flax", "flax"), ("optax", "optax"), ("torch", "torch"),
            ("transformers", "transformers"))},
    }
    report = Reporter(json_out, common)
    log(f"load average {loadavg_start}; jax devices {jax.devices()}; "
        f"torch threads {torch.get_num_threads()}")

    log("matmul peak")
    peak = bench_peak(report, pick(None, "peak_size", PEAK_SIZE), PEAK_REPEATS)
    if args.peak_flops:
        peak = args.peak_flops
        report.emit("peak/given", peak, "FLOP/s", source="--peak_flops")
    batch_np = make_batch(batch, length)
    log(f"batch {batch}x{length}: {int(batch_np['decoder_loss_weights'].sum())} target tokens")
    for i, name in enumerate(models):
        n = steps if name in ("prot_t5_small", "prot_t5_tiny") or args.quick else min(
            steps, args.base_steps)
        log(f"{name}: protlm-jax" + ("" if args.no_hf else " and Hugging Face")
            + f", {warmup} warm-up + {n} steps each, interleaved")
        with tempfile.TemporaryDirectory(prefix="protlm-bench-") as model_dir:
            ours_step, ours_finish = prepare_ours(report, name, batch_np, model_dir, peak=peak)
            sides = {"protlm_jax": ours_step}
            if not args.no_hf:
                hf_step, hf_finish = prepare_hf(report, name, batch_np, peak=peak)
                sides["hf_torch"] = hf_step
            timing = _interleaved(sides, warmup, n)
            ours = ours_finish(timing["protlm_jax"])
        log(f"  ours {ours['value']:.0f} tokens/s, MFU {ours['mfu']:.3f}")
        if not args.no_hf:
            hf = hf_finish(timing["hf_torch"])
            log(f"  HF {hf['value']:.0f} tokens/s, MFU {hf['mfu']:.3f}")
            compare(report, name, ours, hf)
            del sides, hf_step
        if args.bf16 and i == 0:
            log(f"{name}: protlm-jax bfloat16 activations")
            with tempfile.TemporaryDirectory(prefix="protlm-bench-") as model_dir:
                bf_step, bf_finish = prepare_ours(report, name, batch_np, model_dir, peak=peak,
                                                  dtype="bfloat16")
                bf = bf_finish(_interleaved({"bf16": bf_step}, warmup, n)["bf16"])
            report.emit(f"train_step/{name}/bfloat16_vs_float32", bf["value"], "tokens/s",
                        model=name, baseline=ours["value"], speedup=bf["value"] / ours["value"])
    if args.allocator_ab:
        log(f"{models[0]}: allocator before/after, {args.allocator_ab} pairs of processes")
        bench_allocator(report, models[0], args.allocator_ab, batch=batch, length=length,
                        warmup=warmup, steps=min(steps, args.base_steps)
                        if models[0] not in ("prot_t5_small", "prot_t5_tiny") else steps)
    bert_layers = pick(args.bert_layers, "bert_layers", DEFAULT_BERT_LAYERS)
    if bert_layers:
        bench_bert(report, bert_layers, batch, length, steps=steps, warmup=warmup, peak=peak,
                   hf=not args.no_hf, tiny=args.quick)
    if not args.no_hf:
        xlnet_layers = pick(args.xlnet_layers, "xlnet_layers", 0)
        if xlnet_layers:
            bench_xlnet(report, xlnet_layers, peak, tiny=args.quick)
        lora_layers = pick(args.lora_layers, "lora_layers", 0)
        if lora_layers:
            bench_lora(report, lora_layers, peak, tiny=args.quick)
    wall = time.perf_counter() - t_start
    report.emit("run/wall", wall, "s", models=models, steps=steps, batch=batch, length=length)
    log(f"done: {len(report.lines)} lines in {wall:.1f} s")
    json_out.close()
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
