"""``protlm plan``: compile the train step abstractly; print memory, FLOPs and time.

Nothing of model size is ever allocated. Parameters come from
``jax.eval_shape(model.init)``, the optimizer state from ``eval_shape`` of
``optimizer.init`` (with ``Trainer.opt_state_shardings``, as
``Trainer.init_state`` places it), and the train
step is the ``Trainer.train_fn`` of the real trainer, lowered and compiled on
``jax.ShapeDtypeStruct``s that carry their shardings. XLA then answers:

* ``compiled.memory_analysis()``: per-device argument, output, aliased
  (donated), temporary (activations, gradients, workspace) and code bytes;
* ``compiled.cost_analysis()``: FLOPs of the *partitioned* per-device program
  (``lowered.cost_analysis()`` is the global, unpartitioned program).

Any model family plans (``models.build_model``: T5, BERT, ALBERT, ELECTRA);
the objective defaults to the family's (encoder-decoder, MLM, ELECTRA).

XLA's cost analysis counts the body of a ``while`` loop once, whatever its trip
count, so a step with scanned layers (``scan_layers=True``) or gradient
accumulation (``microbatches > 1``) would be undercounted by about the number
of layers. The FLOPs are then measured on small unscanned probes of the same
model (1-2 layers per stack: T5's encoder and decoder, ELECTRA's discriminator
and generator, one BERT/ALBERT stack; one microbatch of the same global batch)
and extrapolated linearly in depth, which is exact for identical layers.

On a CPU host, simulate a pod slice with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (``run`` sets it when
jax has not started yet). Per-device numbers depend only on the model axis and
the batch per data shard, so a 1x8 mesh at 16 rows predicts each core of a
128x8 mesh at 2,048 rows; ``target_data_parallelism`` scales the throughput.

Usage (after the gin wrapper ``gin_config.plan_configs``)::

    protlm plan --gin_file=gin/experiments/prot_t5_xl_uniref50.gin \\
        --mesh=1x8 --batch_per_data_shard=16 --target_mesh=128x8
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from protlm_jax import models, optimizers, partitioning, trainer
from protlm_jax.data import pipeline as data_pipeline
from protlm_jax.errors import ProtlmError

ModelConfig = Any  # any registered family's config


def stack_depths(config: ModelConfig) -> tuple[int, ...]:
    """Layers of each stack (the family's ``stack_depths``: T5 (encoder,
    decoder), ELECTRA (discriminator, generator), BERT/ALBERT (layers,);
    ALBERT counts applications of its shared groups: the compute)."""
    return tuple(models.family_for(config).stack_depths(config))


def with_stack_depths(config: ModelConfig, depths: Sequence[int]) -> ModelConfig:
    """An unscanned copy of ``config`` with ``depths`` layers per stack (FLOP probes)."""
    return models.family_for(config).with_stack_depths(config, depths)


def _towers(config: ModelConfig) -> Sequence[Any]:
    """The configs holding dtype / remat / scan_layers."""
    return models.family_for(config).towers(config)


def _scanned(config: ModelConfig) -> bool:
    return any(c.scan_layers for c in _towers(config))


def default_objective(config: ModelConfig) -> Any:
    """The pretraining loss of the family (T5: encoder-decoder; BERT/ALBERT: MLM; …)."""
    return models.family_for(config).default_objective()


def abstract_train_state(run: trainer.Trainer) -> trainer.TrainState:
    """``run.abstract_state()``: the state ``init_state`` would build, as
    sharded ``ShapeDtypeStruct``s (one function for the trainer and the plan)."""
    return run.abstract_state()


def bytes_per_device(tree: Any) -> int:
    """Σ over leaves of shard size × itemsize (the largest shard of each leaf).

    Args:
      tree: ``ShapeDtypeStruct``s (or arrays) with shardings.

    Returns:
      Bytes one device holds for the tree.
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(tuple(leaf.shape))
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def total_bytes(tree: Any) -> int:
    """Σ over leaves of the global size × itemsize."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------- compile ---

def _make_trainer(model_config: ModelConfig, optimizer_config: optimizers.OptimizerConfig,
                  train_config: trainer.TrainConfig, model_feature_lengths: Mapping[str, int],
                  devices: Sequence[Any], objective: Any) -> trainer.Trainer:
    # The module and its init features follow the config class, as in training.
    model, init_inputs = models.build_model(model_config)
    return trainer.Trainer(
        model=model, objective=objective, optimizer_config=optimizer_config,
        config=train_config, model_feature_lengths=model_feature_lengths,
        init_inputs=init_inputs, devices=list(devices))


def _cost(analysis: Any) -> float:
    # Older jax returns a one-element list of dicts; some backends return None.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float((analysis or {}).get("flops", 0.0))


def _compile_step(run: trainer.Trainer) -> dict:
    """Lowers and compiles ``run``'s train step on its abstract state and batch."""
    state = abstract_train_state(run)
    sharding = partitioning.batch_sharding(run.mesh)
    batch = {k: jax.ShapeDtypeStruct((run.config.batch_size, n), jnp.int32, sharding=sharding)
             for k, n in run.model_feature_lengths.items()}
    start = time.perf_counter()
    lowered = run.train_fn(state).lower(state, batch)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    return {"state": state, "batch": batch, "lowered": lowered, "compiled": compiled,
            "compile_seconds": seconds, "flops_per_device": _cost(compiled.cost_analysis()),
            "flops_global": _cost(lowered.cost_analysis())}


def probe_flops(model_config, optimizer_config, train_config, lengths, devices,
                 objective) -> tuple[float, float, float]:
    """FLOPs (per device, global) of the step extrapolated from shallow probes.

    Unscanned, one-microbatch copies with one layer per stack, and with two in
    one stack at a time (T5: (1, 1), (2, 1), (1, 2) encoder and decoder
    layers; BERT: 1 and 2), give the cost outside the stacks and of one layer
    of each; the step costs ``outside + Σ N_stack·layer_stack``. One
    microbatch of the full global batch does the work of M microbatches (only
    the gradient sums differ, a negligible number of FLOPs).

    Returns:
      ``(flops_per_device, flops_global, seconds spent compiling probes)``.
    """
    config = dataclasses.replace(train_config, microbatches=1)
    depths = stack_depths(model_config)
    base = (1,) * len(depths)
    probes = [base] + [base[:i] + (2,) + base[i + 1:] for i in range(len(depths))]
    costs, seconds = {}, 0.0
    for depth in probes:
        probe = with_stack_depths(model_config, depth)
        out = _compile_step(_make_trainer(probe, optimizer_config, config, lengths,
                                          devices, objective))
        costs[depth] = np.array([out["flops_per_device"], out["flops_global"]])
        seconds += out["compile_seconds"]
    per_layer = [costs[p] - costs[base] for p in probes[1:]]
    outside = costs[base] - sum(per_layer)
    total = outside + sum(n * layer for n, layer in zip(depths, per_layer))
    return float(total[0]), float(total[1]), seconds


# -------------------------------------------------------------------- plan ---

def plan(model_config: ModelConfig, optimizer_config: optimizers.OptimizerConfig,
         train_config: trainer.TrainConfig, model_feature_lengths: Mapping[str, int],
         mesh_shape: tuple[int, int], peak_flops_per_device: float,
         rule_set: str = "1d", *, assumed_mfu: float = 0.5,
         objective: Any = None, target_data_parallelism: Optional[int] = None,
         correct_loop_flops: bool = True) -> dict:
    """Compiles the train step abstractly and predicts memory, FLOPs and time.

    Args:
      model_config: the model shape, any family (``T5Config``, ``BertConfig``,
        ``ElectraConfig``; dtype, scan_layers, remat_policy included).
      optimizer_config: the optimizer (its state is part of the memory).
      train_config: ``batch_size`` (global rows), ``microbatches``, ``seed``
        and ``train_steps`` are used; ``model_parallel_size`` and ``rule_set``
        are replaced by ``mesh_shape`` and ``rule_set``.
      model_feature_lengths: model feature name → length, e.g. from
        ``seqio.EncDecFeatureConverter(pack=True).get_model_feature_lengths``.
      mesh_shape: ``(data, model)``; the first ``data * model`` devices are used.
      peak_flops_per_device: peak FLOP/s of one device (0: no time prediction).
      rule_set: logical-axis rules, "1d" or "2d".
      assumed_mfu: the FLOP utilisation assumed for the "expected" time.
      objective: the loss (default: the family's, ``default_objective``).
      target_data_parallelism: also report throughput and run time on a mesh
        with this many data shards (same model axis and batch per data shard).
      correct_loop_flops: measure FLOPs on unscanned probes when the step has
        loops XLA's cost analysis undercounts (scanned layers, microbatches).

    Returns:
      A dict of plain numbers (see ``format_plan`` for their meaning); bytes
      and FLOPs are per device unless the key says ``total``/``global``.

    Raises:
      ProtlmError: too few devices, or a batch that does not split.
    """
    data, model = (int(n) for n in mesh_shape)
    needed = data * model
    devices = jax.devices()
    if data < 1 or model < 1 or len(devices) < needed:
        raise ProtlmError(
            f"mesh {data}x{model} needs {needed} devices, {len(devices)} "
            f"{devices[0].platform} device(s) available; on a CPU host set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} (and "
            "JAX_PLATFORMS=cpu on a machine with fewer accelerators)")
    devices = devices[:needed]
    objective = objective if objective is not None else default_objective(model_config)
    config = dataclasses.replace(train_config, model_parallel_size=model, rule_set=rule_set)
    lengths = dict(model_feature_lengths)
    run = _make_trainer(model_config, optimizer_config, config, lengths, devices, objective)
    out = _compile_step(run)
    state, compiled = out["state"], out["compiled"]

    memory = compiled.memory_analysis()
    mem = {name: int(getattr(memory, f"{name}_size_in_bytes", 0) or 0) if memory else 0
           for name in ("argument", "output", "alias", "temp", "generated_code")}
    # Donated state aliases its output buffers: count them once.
    mem["peak"] = (mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
                   + mem["generated_code"])

    loops = _scanned(model_config) or config.microbatches > 1
    flops_method, probe_seconds = "compiled", 0.0
    flops_device, flops_global = out["flops_per_device"], out["flops_global"]
    if loops and correct_loop_flops:
        flops_device, flops_global, probe_seconds = probe_flops(
            model_config, optimizer_config, config, lengths, devices, objective)
        flops_method = "depth-extrapolated unscanned probes"
    elif loops:
        flops_method = "compiled (loop bodies counted once: undercounted)"

    rows = config.batch_size
    seq_len = lengths.get("encoder_input_tokens", max(lengths.values()))
    tokens = rows * seq_len
    result = {
        "platform": devices[0].platform,
        "mesh": {"data": data, "model": model},
        "devices": needed,
        "rule_set": rule_set,
        "family": models.family_for(model_config).name,
        "dtype": "/".join(sorted({c.dtype for c in _towers(model_config)})),
        "scan_layers": _scanned(model_config),
        "remat_policy": "/".join(sorted({c.remat_policy for c in _towers(model_config)})),
        "optimizer": optimizer_config.name,
        "batch_size": rows,
        "batch_per_data_shard": rows // data,
        "microbatches": config.microbatches,
        "sequence_length": seq_len,
        "tokens_per_step": tokens,
        "total_params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "param_bytes_total": total_bytes(state.params),
        "param_bytes": bytes_per_device(state.params),
        "opt_state_bytes_total": total_bytes(state.opt_state),
        "opt_state_bytes": bytes_per_device(state.opt_state),
        "batch_bytes": bytes_per_device(out["batch"]),
        "argument_bytes": mem["argument"],
        "output_bytes": mem["output"],
        "alias_bytes": mem["alias"],
        "temp_bytes": mem["temp"],
        "generated_code_bytes": mem["generated_code"],
        "peak_bytes": mem["peak"],
        "flops_per_device": flops_device,
        "flops_global": flops_global,
        "flops_per_device_uncorrected": out["flops_per_device"],
        "flops_method": flops_method,
        "compile_seconds": out["compile_seconds"],
        "probe_compile_seconds": probe_seconds,
        "peak_flops_per_device": float(peak_flops_per_device),
        "assumed_mfu": float(assumed_mfu),
        "train_steps": config.train_steps,
    }
    result.update(_timing(result, data, target_data_parallelism))
    return result


def _timing(result: Mapping[str, Any], data: int, target_data: Optional[int]) -> dict:
    """Step time, tokens/s and run length at MFU 1 and at the assumed MFU."""
    peak, mfu = result["peak_flops_per_device"], result["assumed_mfu"]
    if peak <= 0 or result["flops_per_device"] <= 0:
        return {"step_seconds_at_peak": None, "step_seconds": None,
                "tokens_per_second_at_peak": None, "tokens_per_second": None,
                "train_days": None, "target": None}
    at_peak = result["flops_per_device"] / peak
    step = at_peak / mfu if mfu > 0 else float("inf")
    tokens = result["tokens_per_step"]
    timing = {"step_seconds_at_peak": at_peak, "step_seconds": step,
              "tokens_per_second_at_peak": tokens / at_peak,
              "tokens_per_second": tokens / step,
              "train_days": result["train_steps"] * step / 86400, "target": None}
    if target_data:
        # Per-device work is unchanged when only the data axis grows (same rows
        # per data shard); the gradient all-reduce is not modelled.
        scale = target_data / data
        timing["target"] = {
            "mesh": {"data": target_data, "model": result["mesh"]["model"]},
            "devices": target_data * result["mesh"]["model"],
            "batch_size": int(result["batch_size"] * scale),
            "tokens_per_step": int(tokens * scale),
            "step_seconds": step,
            "tokens_per_second": tokens * scale / step,
            "train_days": result["train_steps"] * step / 86400,
        }
    return timing


# ------------------------------------------------------------------ format ---

def _bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def _num(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "-"
    for suffix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:,.2f} {suffix}{unit}"
    return f"{x:,.3g} {unit}".rstrip()


def _seconds(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:,.3f} s"


def format_plan(result: Mapping[str, Any]) -> str:
    """A readable table of a ``plan`` result.

    Args:
      result: the dict ``plan`` returns.

    Returns:
      Multi-line text: the set-up, per-device memory, FLOPs and timing.
    """
    r = result
    mesh = r["mesh"]
    mfu = r["assumed_mfu"]
    rows = [
        ("mesh (data x model)", f"{mesh['data']} x {mesh['model']} = {r['devices']} "
                                f"{r['platform']} devices, rules {r['rule_set']}"),
        ("model", f"{r.get('family', 't5')}: {r['total_params']:,} params, activations "
                  f"{r['dtype']}, "
                  f"scan_layers={r['scan_layers']}, remat={r['remat_policy']}"),
        ("batch", f"{r['batch_size']:,} rows ({r['batch_per_data_shard']:,} per data shard, "
                  f"{r['microbatches']} microbatch(es)) x {r['sequence_length']} = "
                  f"{r['tokens_per_step']:,} tokens/step"),
        ("", ""),
        ("per device", ""),
        ("  parameters", f"{_bytes(r['param_bytes'])}  (all: {_bytes(r['param_bytes_total'])})"),
        ("  optimizer state", f"{_bytes(r['opt_state_bytes'])}  ({r['optimizer']}; all: "
                              f"{_bytes(r['opt_state_bytes_total'])})"),
        ("  batch", _bytes(r["batch_bytes"])),
        ("  XLA arguments", _bytes(r["argument_bytes"])),
        ("  XLA outputs", f"{_bytes(r['output_bytes'])}  "
                          f"(aliased to donated args: {_bytes(r['alias_bytes'])})"),
        ("  XLA temporaries", f"{_bytes(r['temp_bytes'])}  (activations, gradients, workspace)"),
        ("  generated code", _bytes(r["generated_code_bytes"])),
        ("  peak estimate", f"{_bytes(r['peak_bytes'])}  (args + outputs - aliased + temps + code)"),
        ("", ""),
        ("FLOPs / step / device", f"{_num(r['flops_per_device'], 'FLOP')}  ({r['flops_method']})"),
        ("FLOPs / step, global", _num(r["flops_global"], "FLOP")),
        ("peak / device", _num(r["peak_flops_per_device"] or None, "FLOP/s")),
        ("step time at MFU 1", _seconds(r["step_seconds_at_peak"])),
        ("tokens/s at MFU 1", _num(r["tokens_per_second_at_peak"])),
        (f"step time at MFU {mfu:g}", _seconds(r["step_seconds"])),
        (f"tokens/s at MFU {mfu:g}", _num(r["tokens_per_second"])),
        (f"{r['train_steps']:,} steps at MFU {mfu:g}",
         "-" if r["train_days"] is None else f"{r['train_days']:,.1f} days"),
    ]
    target = r.get("target")
    if target:
        tm = target["mesh"]
        rows += [
            ("", ""),
            (f"on {tm['data']} x {tm['model']} ({target['devices']:,} devices)",
             f"batch {target['batch_size']:,} rows = {target['tokens_per_step']:,} tokens/step"),
            (f"  step time at MFU {mfu:g}", _seconds(target["step_seconds"])),
            (f"  tokens/s at MFU {mfu:g}", _num(target["tokens_per_second"])),
            (f"  {r['train_steps']:,} steps", f"{target['train_days']:,.1f} days "
                                             "(gradient all-reduce not modelled)"),
        ]
    rows += [("", ""),
             ("compile time", f"{r['compile_seconds']:,.1f} s"
              + (f" (+ {r['probe_compile_seconds']:,.1f} s FLOP probes)"
                 if r["probe_compile_seconds"] else ""))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() if k or v else "" for k, v in rows)


# --------------------------------------------------------------------- CLI ---

def _parse_mesh(text: str, flag: str) -> tuple[int, int]:
    try:
        data, model = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise ProtlmError(f"{flag}: expected DATAxMODEL (e.g. 2x4), got {text!r}") from None
    if data < 1 or model < 1:
        raise ProtlmError(f"{flag}: mesh axes must be positive, got {text!r}")
    return data, model


def configure_host_devices(count: int) -> None:
    """Makes the CPU platform offer ``count`` devices if jax has not started.

    ``--xla_force_host_platform_device_count`` is read when jax initialises its
    backends; set later it has no effect (the device check in ``plan`` then
    explains). It changes only the CPU platform, so it is harmless on
    accelerator hosts.

    Args:
      count: devices the mesh needs.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={count}").strip()


def plan_configs(configs: Sequence[Any], *, mesh: Optional[str] = None,
                 peak_tflops: Optional[float] = None, mfu: float = 0.5,
                 batch_per_data_shard: Optional[int] = None, target_mesh: Optional[str] = None,
                 rule_set: Optional[str] = None, flop_probes: bool = True) -> dict:
    """:func:`plan` for the configs of a gin ``train`` run (``protlm plan``).

    Args:
      configs: ``(model_config, train_config, data_config, optimizer_config,
        objective)`` as the gin wrapper reads them from ``train``'s bindings;
        the last two may be missing (defaults).
      mesh: "DATAxMODEL" to compile for (default: all devices, the train
        config's model axis); on a CPU host the devices are simulated.
      peak_tflops: peak TFLOP/s per device (default: the train config's).
      mfu: assumed FLOP utilisation for the expected time.
      batch_per_data_shard: rows per data shard (the global batch becomes
        N x data; default the train config's batch).
      target_mesh: "DATAxMODEL" to also report throughput on.
      rule_set: "1d" or "2d" (default the train config's).
      flop_probes: measure FLOPs on unscanned probes when loops undercount.

    Returns:
      The ``plan`` result.
    """
    model_config, train_config, data_config, *rest = configs
    optimizer_config = rest[0] if rest else optimizers.OptimizerConfig()
    objective = rest[1] if len(rest) > 1 else None
    if mesh:
        shape = _parse_mesh(mesh, "--mesh")
        configure_host_devices(shape[0] * shape[1])
    else:
        model = train_config.model_parallel_size
        shape = (len(jax.devices()) // model, model)
    if batch_per_data_shard:
        train_config = dataclasses.replace(train_config,
                                           batch_size=batch_per_data_shard * shape[0])
    target = None
    if target_mesh:
        target_data, target_model = _parse_mesh(target_mesh, "--target_mesh")
        if target_model != shape[1]:
            raise ProtlmError(f"--target_mesh {target_mesh}: its model axis must equal "
                              f"the compiled mesh's ({shape[1]})")
        target = target_data
    peak = peak_tflops * 1e12 if peak_tflops is not None else train_config.peak_flops_per_device
    converter = data_pipeline.feature_converter(data_config.task, data_config.pack)
    lengths = converter.get_model_feature_lengths(dict(data_config.feature_lengths))
    return plan(model_config, optimizer_config, train_config, lengths, shape, peak,
                rule_set or train_config.rule_set, assumed_mfu=mfu, objective=objective,
                target_data_parallelism=target, correct_loop_flops=flop_probes)
