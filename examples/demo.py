"""``make demo``: the project end to end on the bundled real sample.

Stages (later issues add embedding, probes and export):
  1. prepare   ``data/sample/uniprot_sample.fasta.gz`` (2,000 real UniProtKB
               records) → TFRecord shards + stats.json with ``protlm prepare``;
  2. examples  decoded examples of each pretraining task read from those shards;
  3. train     the tiny model of one family with ``protlm train`` (gin
               experiment ``<model>_demo``: ProtT5 by default, ``--model``
               prot_bert_tiny / prot_albert_tiny / prot_electra_tiny for the
               auto-encoders, prot_xlnet_tiny for ProtXLNet, prot_txl_tiny for
               ProtTXL), then a restart that resumes from the checkpoint, then
               the masked-residue loss on held-out proteins against the unigram
               entropy of the residues (ProtTXL: every next residue, with the
               memory carried and without it on the same segments);
  4. probes    embeds subsets of the probe sets with the demo model, fits the
               SS CNN (Q3/Q8, CASP12 validation chains) and the localization /
               membrane FNN (Q13/Q2, SCL2205 test) beside the one-hot /
               composition baseline, prints the tables (``stage_probes``);
  5. export    ``protlm export-hf`` of the demo model, the ProtTrans snippet
               (ProtT5's, ProtBert's for the auto-encoders, the XLNet one with
               its left padding for ProtXLNet; for ProtTXL, which transformers
               5 cannot run, the card's torch snippet) on held-out proteins,
               and its largest difference from ``protlm embed``
               (``stage_export``);
  6. generate  ProtXLNet and ProtTXL: ``protlm generate`` samples five sequences
               (top_p 0.9, top_k 0, 100 residues: the ProtTrans Generate
               notebook's settings) (``stage_generate``).

Run as ``python examples/demo.py --workdir DIR [--model prot_bert_tiny]``
(``make demo DEMO_MODEL=prot_bert_tiny``). It is a user of the library, not a
part of it: every stage is a ``protlm`` command or a library call.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import pathlib
import shutil
import sys
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from protlm_jax import cli, embed  # noqa: E402
from protlm_jax.data import inspect_tasks, locations, sample  # noqa: E402
from protlm_jax.data.residues import RARE_TO_X  # noqa: E402
from protlm_jax.hf import convert  # noqa: E402
from protlm_jax.probes import datasets, evaluate, features, train  # noqa: E402

SAMPLE = sample.SAMPLE
CORPUS = sample.CORPUS
# Pretraining tasks shown in stage 2, with their feature lengths.
TASKS = {"prott5": {"inputs": 96, "targets": 96},
         "t5_span_corruption": {"inputs": 96, "targets": 96},
         "mlm": {"inputs": 96},
         "plm": {"inputs": 96, "target_positions": 16},
         "clm": {"stream": 96}}
# Demo models: (display name, pretraining task, held-out eval feature lengths).
MODELS = {
    "prot_t5_tiny": ("ProtT5-tiny", "prott5", {"inputs": 512, "targets": 512}),
    "prot_bert_tiny": ("ProtBert-tiny", "mlm", {"inputs": 512}),
    "prot_albert_tiny": ("ProtAlbert-tiny", "mlm", {"inputs": 512}),
    "prot_electra_tiny": ("ProtElectra-tiny", "mlm", {"inputs": 512}),
    "prot_xlnet_tiny": ("ProtXLNet-tiny", "plm", {"inputs": 512, "target_positions": 85}),
    # Held-out proteins as 24 streams cut into the training segments (64 tokens),
    # read in order with the evaluation memory (128) and again without it.
    "prot_txl_tiny": ("ProtTXL-tiny", "clm", {"stream": 64}),
}
# Training steps of the demo where 300 are too few: ProtTXL-tiny needs ~1,000
# before it uses context at all (measured: until step 500 it predicts the
# unigram distribution, with or without memory).
DEMO_STEPS = {"prot_txl_tiny": 1500}

# Auto-regressive demo models: stage 6 samples sequences from them.
GENERATING = ("prot_xlnet_tiny", "prot_txl_tiny")


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def stage_prepare(workdir: pathlib.Path) -> pathlib.Path:
    """Prepares the bundled sample; returns the data dir holding the corpus."""
    data_dir = workdir / "data"
    out = data_dir / CORPUS
    # workdir/data becomes the run's data root (--gin.DATA_DIR): the fetched
    # sets the probes read stay where `make data` put them.
    fetched = data_dir / locations.FETCHED
    if not fetched.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fetched.symlink_to(pathlib.Path(locations.fetched_dir()).resolve(),
                           target_is_directory=True)
    _banner(f"1. protlm prepare --input {SAMPLE.name} --output {out}")
    code = cli.main(["prepare", "--input", str(SAMPLE), "--output", str(out),
                     "--num_shards", "4", "--validation_fraction", "0.05", "--dedup"])
    if code:
        raise SystemExit(code)
    stats = json.loads((out / "stats.json").read_text())
    print(json.dumps(stats, indent=1))
    return data_dir


def stage_examples(data_dir: pathlib.Path) -> None:
    """Prints decoded examples of every task on the prepared sample."""

    for objective, lengths in TASKS.items():
        task = f"{CORPUS}_{objective}"
        _banner(f"2. protlm examples --task {task}")
        print(inspect_tasks.format_examples(task, lengths, split="validation", num=2,
                                            data_dir=str(data_dir)))


def unigram_entropy(data_dir: pathlib.Path) -> float:
    """Entropy (nats) of the residue distribution of the training split."""
    counts: collections.Counter = collections.Counter()
    pattern = str(data_dir / CORPUS / "train.tfrecord-*")
    for raw in tf.data.TFRecordDataset(tf.io.gfile.glob(pattern)).as_numpy_iterator():
        seq = tf.train.Example.FromString(raw).features.feature["sequence"].bytes_list.value[0]
        counts.update(seq.decode().translate(RARE_TO_X))
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def stage_train(workdir: pathlib.Path, data_dir: pathlib.Path, steps: int,
                model: str = "prot_t5_tiny") -> pathlib.Path:
    """Trains, restarts (resuming), evaluates against the unigram entropy.

    Returns:
      The MODEL_DIR.
    """
    _, objective, eval_lengths = MODELS[model]
    model_dir = workdir / model
    shutil.rmtree(model_dir, ignore_errors=True)  # each demo trains from scratch
    common = [f"--gin_file=gin/experiments/{model}_demo.gin",
              f"--gin.MODEL_DIR={model_dir}", f"--gin.DATA_DIR={data_dir}"]
    _banner(f"3. protlm train {' '.join(common)} --gin.TRAIN_STEPS={steps}")
    if cli.main(["train", *common, f"--gin.TRAIN_STEPS={steps}"]):
        raise SystemExit("training failed")
    more = steps + 50
    _banner(f"3b. the same command with --gin.TRAIN_STEPS={more}: resumes from step {steps}")
    if cli.main(["train", *common, f"--gin.TRAIN_STEPS={more}", "--gin.EVAL_PERIOD=0",
                 "--gin.LOG_PERIOD=25"]):
        raise SystemExit("training failed")
    # Held-out proteins are scored nearly whole (512 tokens; 74 % of their
    # residues, 26 of the 100 are longer): a protein's own composition is most
    # of what a few minutes of training can learn, and it needs the context.
    # A finite pass keeps every protein: the last batch is padded with
    # zero-weight rows (batch 24 splits over 8 simulated devices).
    eval_lengths = repr(eval_lengths)
    _banner(f"3c. protlm eval on held-out proteins (validation split, {eval_lengths})")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["eval", f"--gin_file=gin/models/{model}.gin",
                         "--gin_file=gin/runs/eval.gin", f"--gin.MODEL_DIR={model_dir}",
                         f"--gin.DATA_DIR={data_dir}",
                         f"--gin.MIXTURE_OR_TASK_NAME={CORPUS}_{objective}",
                         f"--gin.TASK_FEATURE_LENGTHS={eval_lengths}", "--gin.BATCH_SIZE=24"])
    if code:
        raise SystemExit("evaluation failed")
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    print(json.dumps(result))
    if "perplexity_no_memory" in result:  # a recurrent model: what its memory is worth
        gain, se = result["memory_gain"], result.get("memory_gain_stderr", float("nan"))
        print(f"held-out perplexity with memory {result['perplexity']:.3f} "
              f"({result['bits_per_residue']:.4f} bits/residue), without memory on the same "
              f"segments {result['perplexity_no_memory']:.3f} "
              f"({result['bits_per_residue_no_memory']:.4f}); memory lowers the loss by "
              f"{gain:.4f} ± {se:.4f} nats/token ({gain / se:.1f} standard errors)")
    entropy = unigram_entropy(data_dir)
    gap = entropy - result["masked_loss"]
    stderr = result.get("masked_loss_stderr", float("nan"))
    print(f"masked-residue cross-entropy on held-out proteins: {result['masked_loss']:.4f} "
          f"± {stderr:.4f} nats (standard error, {int(result.get('masked_tokens', 0))} "
          f"masked residues); unigram entropy of the training residues: {entropy:.4f} "
          f"nats ({'below' if gap > 0 else 'above'} it by {abs(gap):.4f} = "
          f"{abs(gap) / stderr:.1f} standard errors)")
    return model_dir


def stage_probes(workdir: pathlib.Path, model_dir: pathlib.Path,
                 name: str = "ProtT5-tiny") -> dict:
    """Embeds subsets of the probe sets with the demo model and fits the SS CNN
    and the localization/membrane FNN beside the one-hot / composition baseline.

    Subsets keep the stage near two minutes on two cores: SS trains on 1,000
    CASP12 training_30 chains of ≤ 500 residues and tests on all 211 CASP12
    validation chains; SCL2205 trains on 2,000 proteins of ≤ 1,000 residues
    and tests on a seeded random 1,000 of its 2,631 test proteins.

    Returns:
      task name → result dict (also written under ``workdir/probes/<task>``).
    """
    fetched = datasets.default_data_dir()
    if not os.path.exists(os.path.join(fetched, datasets.SIDECHAINNET_DSSP)):
        print(f"probes skipped: {fetched} lacks the probe data (run `make data`)")
        return {}
    embedder = embed.load_model(str(model_dir))
    rows = [features.ModelFeatures(embedder, name=f"{name} (demo)"), features.OneHot()]
    config = train.ProbeConfig(max_epochs=10, patience=3)
    # Learned positions (the BERT family's tiny configs: 1,024) bound what the
    # model can embed; longer proteins leave every row of the table (counted).
    longest = None if embedder.max_tokens is None else embedder.max_tokens - 2
    results = {}
    for spec, limits in (("ss_casp12", dict(train_limit=1000, max_train_length=500)),
                         ("scl2205", dict(train_limit=2000, max_train_length=1000,
                                          test_limit=1000))):
        if longest is not None:
            limits["max_test_length"] = longest
            limits["max_train_length"] = min(limits["max_train_length"], longest)
        _banner(f"4. protlm probe --task {spec} --model {model_dir} "
                + " ".join(f"--{k} {v}" for k, v in limits.items()))
        task = datasets.load_task(spec, fetched, **limits)
        if longest is not None:
            for test_name, test in datasets.load_task(spec, fetched).tests.items():
                dropped = sum(len(seq) > longest for seq in test.sequences)
                print(f"{test_name}: {dropped} of its {len(test)} proteins are longer than "
                      f"the model's {longest:,} residues: left out (every row) before "
                      "the subset is drawn")
        result = evaluate.run_task(task, rows, config=config, log=None)
        evaluate.write_outputs(result, str(workdir / "probes" / spec))
        print(evaluate.markdown_table(result))
        results[spec] = result
    return results


def stage_export(workdir: pathlib.Path, model_dir: pathlib.Path) -> float:
    """Exports the demo model to Hugging Face and checks the published snippet.

    ProtT5: ``protlm export-hf --encoder_only`` writes a ``T5EncoderModel``
    directory and the ProtTrans snippet (``T5Tokenizer``) runs on it. The
    auto-encoders: ``protlm export-hf`` writes ``*ForMaskedLM`` /
    ``ElectraForPreTraining`` and the ProtBert snippet runs on its base model.
    Either runs in transformers (torch, CPU) on held-out proteins (the
    validation split) and is compared with ``protlm embed`` per residue.

    Returns:
      The largest absolute difference over all residues.
    """
    embedder = embed.load_model(str(model_dir))
    is_t5 = embedder.family.name == "t5"
    snippet = {"t5": "ProtTrans", "xlnet": "ProtTrans XLNet",
               "txl": "the card's torch"}.get(embedder.family.name, "ProtBert")
    hf_dir = workdir / f"{model_dir.name}_hf"
    extra = ["--encoder_only"] if is_t5 else []
    _banner(f"5. protlm export-hf --model {model_dir} --output {hf_dir} {' '.join(extra)}")
    if cli.main(["export-hf", "--model", str(model_dir), "--output", str(hf_dir), *extra]):
        raise SystemExit("export failed")
    print(f"files: {', '.join(sorted(os.listdir(hf_dir)))}")
    pattern = str(workdir / "data" / CORPUS / "validation.tfrecord-*")
    held_out = []
    for raw in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))).as_numpy_iterator():
        feature = tf.train.Example.FromString(raw).features.feature
        seq = feature["sequence"].bytes_list.value[0].decode()
        if len(seq) <= 400:
            held_out.append((feature["id"].bytes_list.value[0].decode(), seq))
        if len(held_out) == 6:
            break
    theirs = convert.prottrans_embeddings(str(hf_dir), [s for _, s in held_out])
    ours = dict(embedder.embed(held_out))
    worst = 0.0
    print(f"{snippet} snippet (torch CPU) vs protlm embed, per residue"
          f"{' (a left-padded batch)' if embedder.family.layout.padding == 'left' else ''}:")
    for (ident, seq), emb in zip(held_out, theirs):
        diff = float(np.abs(ours[ident] - emb).max())
        worst = max(worst, diff)
        print(f"  {ident:<30} L={len(seq):<4} shape {tuple(emb.shape)}  max |diff| {diff:.2e}")
    print(f"largest difference from protlm embed: {worst:.2e} "
          f"({'within' if worst <= 1e-5 else 'ABOVE'} 1e-5)")
    return worst


def stage_generate(workdir: pathlib.Path, model_dir: pathlib.Path) -> list:
    """``protlm generate`` (auto-regressive families): a few sampled sequences,
    with their residue composition beside the training residues'.

    Returns:
      The generated sequences.
    """
    out = workdir / f"{model_dir.name}_generated.fasta"
    args = ["generate", "--model", str(model_dir), "--num", "5", "--output", str(out),
            "--max_length", "100", "--top_p", "0.9", "--top_k", "0", "--seed", "0"]
    _banner(f"6. protlm {' '.join(args)}")
    if cli.main(args):
        raise SystemExit("generation failed")
    text = out.read_text()
    print(text)
    sequences = ["".join(block.splitlines()[1:]) for block in text.split(">")[1:]]
    counts = collections.Counter("".join(sequences))
    total = sum(counts.values())
    print("residue shares of the generated sequences (%): " + " ".join(
        f"{r}{100 * c / total:.0f}" for r, c in counts.most_common()))
    return sequences


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/protlm-demo",
                        help="where the demo writes (default /tmp/protlm-demo)")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="steps of the training stage (0: skip it; default 300, "
                        "ProtTXL-tiny 1500)")
    parser.add_argument("--model", default="prot_t5_tiny", choices=sorted(MODELS),
                        help="the family to train: gin/experiments/<model>_demo.gin "
                        "(default prot_t5_tiny)")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = stage_prepare(workdir)
    stage_examples(data_dir)
    steps = args.train_steps if args.train_steps is not None else DEMO_STEPS.get(args.model,
                                                                                300)
    if steps:
        model_dir = stage_train(workdir, data_dir, steps, args.model)
        stage_probes(workdir, model_dir, MODELS[args.model][0])
        stage_export(workdir, model_dir)
        if args.model in GENERATING:
            stage_generate(workdir, model_dir)
    _banner(f"demo done: shards and stats in {data_dir / CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
