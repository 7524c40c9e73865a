"""Where the time of one train step goes, part by part: protlm-jax (XLA:CPU) and HF torch.

Run from the repository root::

    .venv/bin/python benchmarks/train_profile.py [--models prot_t5_small] [--steps 2]
        [--batch 8] [--length 512] [--no-dots] [--quick]

For each model, in one process and one machine state (JSON lines on stdout;
``benchmarks/README.md`` says what each line means):

1. **Ours.** The Trainer's jitted step (as ``train_step.py`` builds it, AdamW)
   runs ``--steps`` times under ``jax.profiler``. Every XLA:CPU thunk in the
   trace carries its HLO instruction name; the compiled HLO's ``op_name``
   metadata gives the instruction's place in the model (``jvp(...)`` forward,
   ``transpose(jvp(...))`` backward, neither: the update). XLA runs
   independent thunks on both cores at once, so each moment of the step is
   shared equally among the thunks running then, and a moment when none runs
   goes to the thunk that ended last (library dots and reductions finish on
   worker threads after their traced span); the parts therefore add up to the
   span from the first thunk to the last, the rest of the step's wall time
   being host time (dispatch and the result's hand-back).
2. **Hugging Face.** ``train_step.build_hf``'s step (``T5ForConditionalGeneration``,
   ``torch.optim.AdamW``) under ``torch.profiler`` with the phases marked by
   ``record_function``; each aten op's self time goes to a part by its name
   and the ops it runs under; time outside any op (Python) is host time.
3. **Optimizer update alone.** AdamW and Adafactor: optax's (as the Trainer
   configures it) jitted on the model's parameter tree, and torch's
   (``torch.optim.AdamW``, ``transformers.optimization.Adafactor``) on the same
   model, gradients set to random values; best of 3.
4. **Dot kernels alone** (unless ``--no-dots``): every distinct dot in our
   compiled step (operand shapes and dimension numbers, fused or not), timed
   alone in jax (as in the step: the same ``dot_general``) and in torch
   (``torch.matmul`` on the operands brought to [batch, M, K] x [batch, K, N]
   beforehand, so it measures torch's kernel only), each times its count in
   the step: the part of the step's matmul time that is the kernels' own.

Parts: ``matmul`` (the dense projections: q, k, v, o, the feed-forward and
the LM head), ``attention`` (scores, bias and mask, softmax, weighted sum),
``softmax_ce`` (the loss over the vocabulary), ``norm_act`` (RMS norms,
ReLU, residual adds, casts), ``gathers`` (the token embedding and its
gradient; our relative-position bias counts as attention, HF's tiny
embedding lookup of it as a gather), ``optimizer`` (the update, the finite check and
the global norm), ``host``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from _common import Reporter, best_time, claim_stdout, version

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import train_step  # noqa: E402  (after the environment is fixed)
from protlm_jax import host_memory  # noqa: E402

PARTS = ("matmul", "attention", "softmax_ce", "norm_act", "gathers", "optimizer", "host")
PHASES = ("forward", "backward", "optimizer", "host")
_PROJECTIONS = {"query", "key", "value", "out", "wi", "wo", "wi_0", "wi_1", "logits_dense"}


def log(message: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------- ours ---

def classify_op_name(op_name: str) -> tuple[str, str]:
    """(phase, part) of an HLO instruction from its ``op_name`` metadata."""
    if "transpose(jvp(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    else:
        return "optimizer", "optimizer"
    segments = op_name.split("/")
    if not any(s.startswith("T5.") for s in segments):
        return phase, "softmax_ce"   # the loss, outside the model's apply
    if any(".attend" in s for s in segments):
        return phase, "matmul"       # the tied LM head
    for i, seg in enumerate(segments):
        if seg.endswith("attention"):
            nxt = segments[i + 1] if i + 1 < len(segments) else ""
            return phase, "matmul" if nxt in _PROJECTIONS else "attention"
        if seg == "relpos_bias":
            return phase, "attention"   # the bias, its gather and its gradient's sum
        if seg == "token_embedder":
            return phase, "gathers"
        if seg == "mlp":
            nxt = segments[i + 1] if i + 1 < len(segments) else ""
            return phase, "matmul" if nxt in _PROJECTIONS else "norm_act"
        if seg in _PROJECTIONS:
            return phase, "matmul"
    return phase, "norm_act"


_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+?) ([\w\-]+)\((.*)")
_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\]")


def parse_hlo(text: str) -> tuple[dict, dict, list]:
    """Instruction name -> op_name, name -> (dtype, shape), and the dots.

    Each dot is ``(op_name, lhs (dtype, shape), rhs shape, dimension numbers)``.
    """
    op_names, shapes, dots = {}, {}, []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, type_, opcode, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', line)
        op_names[name] = meta.group(1) if meta else ""
        shape = _SHAPE.match(type_)
        if shape:
            shapes[name] = (shape.group(1),
                            tuple(int(d) for d in shape.group(2).split(",") if d))
        if opcode == "dot":
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            dims = {k: tuple(int(d) for d in v.split(",") if d) for k, v in re.findall(
                r"(lhs_batch_dims|rhs_batch_dims|lhs_contracting_dims|rhs_contracting_dims)"
                r"=\{([\d,]*)\}", line)}
            dots.append((op_names[name], operands[0], operands[1], dims))
    resolved = [(op, shapes[a], shapes[b], dims) for op, a, b, dims in dots
                if a in shapes and b in shapes]
    return op_names, shapes, resolved


def attributed_times(events: list[dict]) -> list[float]:
    """Each event's share of wall time (µs), the shares adding up to the span
    from the first event's start to the last one's end.

    At every moment the running events split the time equally. A moment when
    none runs goes to the event that ended last: XLA:CPU's library dots
    (``dot``/``dot_general`` thunks, Eigen) and reductions return from their
    traced span before their worker threads finish, the executor waiting for
    them untraced (a lone 4096x2048 product: a 14 ms span, 222 ms of waiting).
    """
    points = sorted([(e["ts"], 1, i) for i, e in enumerate(events)]
                    + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)])
    share = [0.0] * len(events)
    active: set[int] = set()
    last, last_ended = None, None
    for t, kind, i in points:
        if last is not None:
            if active:
                each = (t - last) / len(active)
                for j in active:
                    share[j] += each
            elif last_ended is not None:
                share[last_ended] += t - last
        if kind == 1:
            active.add(i)
        else:
            active.discard(i)
            last_ended = i
        last = t
    return share


def profile_ours(name: str, batch_np: dict, steps: int) -> dict:
    import jax

    with tempfile.TemporaryDirectory(prefix="protlm-profile-") as tmp:
        run, state, fn, gbatch = train_step.build_ours(name, batch_np, tmp)
        for _ in range(2):   # compiles twice (see train_step.WARMUP_STEPS)
            state, _ = fn(state, gbatch)
            jax.block_until_ready(state)
        hlo = fn.lower(state, gbatch).compile().as_text()
        trace_dir = os.path.join(tmp, "trace")
        walls = []
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(steps):
            t = time.perf_counter()
            state, m = fn(state, gbatch)
            jax.block_until_ready((state, m))
            walls.append(time.perf_counter() - t)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                                recursive=True))[-1]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
              if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
    op_names, _, dots = parse_hlo(hlo)
    shares = attributed_times(events)
    table = collections.defaultdict(float)
    per_op = collections.defaultdict(float)
    for e, share in zip(events, shares):
        op = e["args"]["hlo_op"]
        table[classify_op_name(op_names.get(op, ""))] += share / 1e6 / steps
        per_op[op] += share / 1e6 / steps
    busy = sum(shares) / 1e6 / steps
    wall = sum(walls) / steps
    table[("host", "host")] = wall - busy
    return {"table": dict(table), "wall_s": wall, "walls": walls, "busy_s": busy,
            "thunks_per_step": len(events) / steps, "dots": dots,
            "top_ops": sorted(((v, k, op_names.get(k, "")) for k, v in per_op.items()),
                              reverse=True)[:15],
            "top_optimizer_ops": sorted(
                ((v, k, op_names.get(k, "")) for k, v in per_op.items()
                 if classify_op_name(op_names.get(k, ""))[0] == "optimizer"), reverse=True)[:10]}


# --------------------------------------------------------------------- HF ---

def _torch_part_by_name(event) -> str:
    names = []
    e = event
    while e is not None:
        names.append(e.name.lower())
        e = e.cpu_parent
    joined = " ".join(names)
    if any(k in joined for k in ("scaled_dot_product", "flash_attention", "scaleddotproduct",
                                 "softmax")) and "log_softmax" not in joined \
            and "logsoftmax" not in joined:
        return "attention"
    if any(k in joined for k in ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss",
                                 "nllloss")):
        return "softmax_ce"
    if "embedding" in joined:
        return "gathers"
    if event.name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "attention" if event.name in ("aten::bmm", "aten::baddbmm") else "matmul"
    return "norm_act"


def _torch_parts(events) -> dict:
    """Event id -> (phase, part). A backward op takes the part of the forward op
    that created its autograd node (same ``sequence_nr``): ``BmmBackward0``
    under the attention is attention, under ``aten::linear`` a matmul."""
    def phase_of(e):
        while e is not None:
            if e.name in ("forward", "backward", "optimizer"):
                return e.name
            e = e.cpu_parent
        return None

    forward_part = {}
    out = {}
    for e in events:
        phase = phase_of(e)
        if phase == "forward":
            part = _torch_part_by_name(e)
            out[id(e)] = (phase, part)
            if e.sequence_nr >= 0:
                forward_part.setdefault(e.sequence_nr, part)
    for e in events:
        phase = phase_of(e)
        if phase == "backward":
            part, p = None, e
            while p is not None and part is None:
                if p.name.endswith(("Backward0", "Backward1")) and p.sequence_nr >= 0:
                    part = forward_part.get(p.sequence_nr)
                p = p.cpu_parent
            out[id(e)] = (phase, part or _torch_part_by_name(e))
        elif phase == "optimizer":
            out[id(e)] = (phase, "optimizer")
    return out


def profile_hf(name: str, batch_np: dict, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    _, step = train_step.build_hf(name, batch_np)
    for _ in range(2):
        step()
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            step(parts=record_function)
            walls.append(time.perf_counter() - t)
    table = collections.defaultdict(float)
    busy = 0.0
    events = prof.events()
    parts = _torch_parts(events)
    for e in events:
        if e.name in ("forward", "backward", "optimizer") or id(e) not in parts:
            continue   # Python between ops: host time, counted below
        self_s = e.self_cpu_time_total / 1e6 / steps
        table[parts[id(e)]] += self_s
        busy += self_s
    wall = sum(walls) / steps
    table[("host", "host")] = wall - busy
    return {"table": dict(table), "wall_s": wall, "walls": walls, "busy_s": busy}


# -------------------------------------------------------------- optimizer ---

def random_params(cfg) -> dict:
    """A T5 parameter tree of ``cfg``'s shapes, N(0, 0.05) (seed 0): inputs for
    timing updates, not a trained or initialised model."""
    import flax.linen as nn
    import jax
    import numpy as np

    from protlm_jax.models import t5

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape, np.float32)
                                                    * 0.05),
                        nn.meta.unbox(t5.abstract_params(cfg)))


def time_optimizers(name: str, repeats: int = 3) -> dict:
    """Seconds of one optimizer update alone, ours (optax, jitted) and torch's."""
    import jax
    import optax
    import torch
    import transformers

    from protlm_jax import optimizers
    from protlm_jax.hf import t5 as hf_t5

    cfg = train_step.model_config(name, dropout_rate=0.0)
    params = random_params(cfg)
    grads = jax.tree.map(lambda p: p * 0.01 + 1e-3, params)
    model = transformers.T5ForConditionalGeneration(hf_t5.hf_config_from_t5config(cfg))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for opt_name in ("adamw", "adafactor"):
        tx = optimizers.make_optimizer(optimizers.OptimizerConfig(
            name=opt_name,
            schedule=optimizers.ScheduleConfig(name="constant", base=train_step.LEARNING_RATE)))

        @jax.jit
        def update(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        state = tx.init(params)
        p = params
        ours = best_time(lambda: jax.block_until_ready(update(p, state, grads)),
                                    repeats)
        if opt_name == "adamw":
            topt = torch.optim.AdamW(model.parameters(), lr=train_step.LEARNING_RATE)
        else:
            topt = transformers.optimization.Adafactor(
                model.parameters(), lr=train_step.LEARNING_RATE, decay_rate=-0.8,
                clip_threshold=1.0, scale_parameter=True, relative_step=False)
        theirs = best_time(topt.step, repeats)
        out[opt_name] = (ours, theirs)
    return out


# ------------------------------------------------------------------- dots ---

def time_dots(dots: list, repeats: int = 3) -> list[dict]:
    """Each distinct dot alone: jax as in the step, torch on canonical operands."""
    import jax
    import numpy as np
    import torch

    counts = collections.Counter((lhs, rhs, tuple(sorted(d.items()))) for _, lhs, rhs, d in dots)
    parts = collections.defaultdict(collections.Counter)   # signature -> {"phase/part": n}
    for op, lhs, rhs, d in dots:
        parts[(lhs, rhs, tuple(sorted(d.items())))]["/".join(classify_op_name(op))] += 1
    rows = []
    for (lhs, rhs, dims), count in counts.items():
        d = dict(dims)
        lb, lc = d.get("lhs_batch_dims", ()), d.get("lhs_contracting_dims", ())
        rb, rc = d.get("rhs_batch_dims", ()), d.get("rhs_contracting_dims", ())
        if lhs[0] != "f32" or rhs[0] != "f32":
            continue
        ls, rs = lhs[1], rhs[1]
        rng = np.random.default_rng(0)
        a = rng.standard_normal(ls, np.float32)
        b = rng.standard_normal(rs, np.float32)
        f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, ((lc, rc), (lb, rb))))
        ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
        t_jax = best_time(lambda: f(ja, jb).block_until_ready(), repeats)
        lm = [i for i in range(len(ls)) if i not in lb and i not in lc]
        rn = [i for i in range(len(rs)) if i not in rb and i not in rc]
        batch = int(np.prod([ls[i] for i in lb])) if lb else 1
        m = int(np.prod([ls[i] for i in lm])) if lm else 1
        k = int(np.prod([ls[i] for i in lc])) if lc else 1
        n = int(np.prod([rs[i] for i in rn])) if rn else 1
        ta = torch.from_numpy(np.ascontiguousarray(
            a.transpose(list(lb) + lm + list(lc)).reshape(batch, m, k)))
        tb = torch.from_numpy(np.ascontiguousarray(
            b.transpose(list(rb) + list(rc) + rn).reshape(batch, k, n)))
        if batch == 1:
            ta, tb = ta[0], tb[0]
        with torch.no_grad():
            t_torch = best_time(lambda: torch.matmul(ta, tb), repeats)
        rows.append({"lhs": list(ls), "rhs": list(rs),
                     "dims": {k_: list(v) for k_, v in d.items()},
                     "parts": parts[(lhs, rhs, dims)], "dot_batch": batch, "m": m, "n": n,
                     "k": k, "count": count, "flops": 2.0 * batch * m * n * k,
                     "jax_s": t_jax, "torch_s": t_torch})
    return rows


# --------------------------------------------------------------- variants ---

def _attention_before(q_BTHK, k_BSHK, v_BSHK, bias, mask):
    """The attention core as it was before this benchmark's changes: the mask
    folded into a [B, H, T, S] bias by a select, the shared bias broadcast by
    plain broadcasting (gradient: XLA's outer-axis reduce)."""
    import jax
    import jax.numpy as jnp

    masked = jnp.where(mask, bias, jnp.finfo(jnp.float32).min)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTHK, k_BSHK, v_BSHK))
    logits = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1)))) + masked
    unnorm = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1))[..., None])
    out = jax.lax.dot_general(unnorm, v, (((3,), (2,)), ((0, 1), (0, 1))))
    return jnp.swapaxes(out / jnp.sum(unnorm, axis=-1)[..., None], 1, 2)


def time_variants(name: str, batch_np: dict, repeats: int = 5) -> list[tuple]:
    """Before/after timings of this issue's changes, interleaved in one run.

    ``attention_stack``: forward + backward of the model's encoder attention
    cores (its layer count, heads, d_kv; q = k = v = the previous layer's
    output) sharing one [1, H, L, L] bias and the batch's key mask, the
    ``before`` formulation against ``layers.dot_product_attention``.
    ``nonfinite_skip``: the AdamW update of the model's parameter tree kept
    only when finite, by a select over params and state (before) or
    ``lax.cond`` (after, as ``trainer.train_step`` now does).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from protlm_jax import optimizers
    from protlm_jax.models import layers

    cfg = train_step.model_config(name, dropout_rate=0.0)
    b, length = batch_np["encoder_input_tokens"].shape
    h, kv, n = cfg.num_heads, cfg.d_kv, cfg.num_encoder_layers
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, length, h, kv), np.float32) * 0.3)
    bias = jnp.asarray(rng.standard_normal((1, h, length, length), np.float32))
    mask = jnp.asarray(batch_np["encoder_input_tokens"] != 0)[:, None, None, :]

    def stack(core):
        def loss(x, bias):
            y = x
            for _ in range(n):
                y = core(y, y, y, bias, mask)
            return jnp.sum(y * x)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    before = stack(_attention_before)
    after = stack(lambda q, k, v, bias_, mask_: layers.dot_product_attention(
        q, k, v, bias_, mask_))
    diff = max(float(jnp.abs(a - c).max()) for a, c in zip(before(x, bias), after(x, bias)))

    params = random_params(cfg)
    grads = jax.tree.map(lambda p: p * 0.01, params)
    tx = optimizers.make_optimizer(optimizers.OptimizerConfig(
        name="adamw", schedule=optimizers.ScheduleConfig(name="constant", base=1e-4)))
    opt_state = tx.init(params)

    def skip(select):
        def update(params, state, grads):
            finite = jnp.isfinite(optax.global_norm(grads))

            def apply(_):
                updates, new_state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), new_state

            if select:
                new = apply(None)
                return jax.tree.map(lambda a, o: jnp.where(finite, a, o), new, (params, state))
            return jax.lax.cond(finite, apply, lambda _: (params, state), None)
        return jax.jit(update)

    cases = {"attention_stack": (before, after, (x, bias), diff),
             "nonfinite_skip": (skip(True), skip(False), (params, opt_state, grads), 0.0)}
    out = []
    for case, (f_before, f_after, args, max_diff) in cases.items():
        times = {"before": [], "after": []}
        jax.block_until_ready((f_before(*args), f_after(*args)))
        for _ in range(repeats):   # interleaved: both see the same machine state
            for label, f in (("before", f_before), ("after", f_after)):
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[label].append(time.perf_counter() - t)
        out.append((case, min(times["before"]), min(times["after"]), max_diff))
    return out


# -------------------------------------------------------------------- main ---

def _markdown(ours: dict, hf: dict) -> str:
    lines = ["| part | phase | protlm-jax s | HF torch s | ours − HF s |", "|---|---|---|---|---|"]
    keys = sorted(set(ours["table"]) | set(hf["table"]),
                  key=lambda k: (PARTS.index(k[1]), PHASES.index(k[0])))
    for key in keys:
        a, b = ours["table"].get(key, 0.0), hf["table"].get(key, 0.0)
        lines.append(f"| {key[1]} | {key[0]} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    lines.append(f"| **step** | | **{ours['wall_s']:.3f}** | **{hf['wall_s']:.3f}** | "
                 f"{ours['wall_s'] - hf['wall_s']:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="prot_t5_small")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps per side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--no-dots", action="store_true", help="skip the dots-alone timing")
    parser.add_argument("--quick", action="store_true",
                        help="prot_t5_tiny, B=2, L=64, 1 step: checks that it runs")
    args = parser.parse_args(argv)
    # First, before threads or heavy imports: the protlm command's allocator
    # environment (host_memory.reexec_tuned restarts this script under it).
    host_memory.reexec_tuned()
    if args.quick:
        args.models, args.batch, args.length, args.steps = "prot_t5_tiny", 2, 64, 1
    json_out = claim_stdout()
    loadavg = os.getloadavg()
    import torch  # noqa: E402  (after the environment is fixed)

    malloc_tuning = host_memory.retain_freed_memory()
    torch.set_num_threads(os.cpu_count())
    common = {"quick": args.quick, "batch": args.batch, "length": args.length,
              "host": {"cpus": os.cpu_count(), "processor": train_step._cpu_name(),
                       "loadavg_1m": round(loadavg[0], 2), "malloc_tuning": malloc_tuning,
                       "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "torch_threads": torch.get_num_threads()},
              "versions": {k: version(k) for k in ("jax", "jaxlib", "torch", "transformers")}}
    report = Reporter(json_out, common)
    batch_np = train_step.make_batch(args.batch, args.length)
    for name in [m for m in args.models.split(",") if m]:
        log(f"{name}: protlm-jax step under jax.profiler")
        ours = profile_ours(name, batch_np, args.steps)
        log(f"{name}: HF torch step under torch.profiler")
        hf = profile_hf(name, batch_np, args.steps)
        for side, res in (("protlm_jax", ours), ("hf_torch", hf)):
            for (phase, part), seconds in sorted(res["table"].items()):
                report.emit(f"profile/{name}/{side}/{part}/{phase}", seconds, "s",
                            model=name, side=side, part=part, phase=phase)
            report.emit(f"profile/{name}/{side}/step", res["wall_s"], "s", model=name,
                        busy_s=res["busy_s"], step_s=res["walls"],
                        **({"thunks_per_step": ours["thunks_per_step"],
                            "top_ops": [[round(v, 4), k, o[-90:]] for v, k, o in ours["top_ops"]],
                            "top_optimizer_ops": [[round(v, 4), k, o[-90:]]
                                                  for v, k, o in ours["top_optimizer_ops"]]}
                           if side == "protlm_jax" else {}))
        log("\n" + _markdown(ours, hf))
        log(f"{name}: optimizer updates alone")
        for opt_name, (a, b) in time_optimizers(name).items():
            report.emit(f"optimizer/{name}/{opt_name}", a, "s", model=name, baseline=b,
                        speedup=b / a)
        log(f"{name}: before/after variants, interleaved")
        for case, t_before, t_after, max_diff in time_variants(name, batch_np):
            report.emit(f"variant/{name}/{case}", t_after, "s", model=name, baseline=t_before,
                        speedup=t_before / t_after, max_abs_diff=max_diff)
        if not args.no_dots:
            log(f"{name}: {len(ours['dots'])} dots, timed alone")
            rows = time_dots(ours["dots"])
            jax_total = sum(r["jax_s"] * r["count"] for r in rows)
            torch_total = sum(r["torch_s"] * r["count"] for r in rows)
            for r in sorted(rows, key=lambda r: -r["jax_s"] * r["count"]):
                report.emit(f"dots/{name}/shape", r["jax_s"] * r["count"], "s", model=name,
                            baseline=r["torch_s"] * r["count"], **r)
            report.emit(f"dots/{name}/total", jax_total, "s", model=name, baseline=torch_total,
                        speedup=torch_total / jax_total, distinct=len(rows),
                        dots=sum(r["count"] for r in rows))
            log(f"  dots alone: jax {jax_total:.3f} s, torch {torch_total:.3f} s")
    json_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
