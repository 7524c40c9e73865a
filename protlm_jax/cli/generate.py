"""``protlm generate``: sample protein sequences from an auto-regressive model into FASTA."""

from __future__ import annotations

import argparse
import sys

from protlm_jax import generate
from protlm_jax.errors import ProtlmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a training MODEL_DIR or a Hugging Face directory (ProtXLNet)")
    p.add_argument("--num", type=int, required=True, metavar="N", help="sequences to write")
    p.add_argument("--output", required=True, metavar="FASTA", help="the FASTA file to write")
    p.add_argument("--prompt", default="M", metavar="SEQ",
                   help="residues every sequence starts with (default M: an auto-regressive "
                   "model needs at least one token, and most proteins start with Met)")
    p.add_argument("--max_length", type=int, default=100, metavar="N",
                   help="residues per sequence, prompt included (default 100, as the "
                   "ProtTrans Generate notebook); a sequence ends earlier at <sep>")
    p.add_argument("--top_p", type=float, default=0.9, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens reaching P "
                   "(default 0.9; 1 turns it off)")
    p.add_argument("--top_k", type=int, default=0, metavar="K",
                   help="keep the K most likely tokens (default 0: off)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="divide the logits by T (default 1)")
    p.add_argument("--greedy", action="store_true",
                   help="always the most likely token (no sampling)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--batch_size", type=int, default=64, metavar="B",
                   help="sequences drawn together (default 64)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="MODEL_DIR: the checkpoint step (default the latest)")


def run(args: argparse.Namespace) -> int:
    cfg = generate.SamplingConfig(max_length=args.max_length, top_k=args.top_k,
                                  top_p=args.top_p, temperature=args.temperature,
                                  greedy=args.greedy, seed=args.seed)
    if args.batch_size < 1:
        raise ProtlmError(f"--batch_size must be positive, got {args.batch_size}")
    generator = generate.load_generator(args.model, args.step)
    how = "greedy" if args.greedy else (f"top_p={args.top_p} top_k={args.top_k} "
                                        f"temperature={args.temperature} seed={args.seed}")
    records = [(f"generated_{i} prompt={args.prompt} {how}", seq)
               for i, seq in enumerate(generator.sample(args.num, args.prompt, cfg,
                                                        args.batch_size))]
    generate.write_fasta(args.output, records)
    lengths = [len(s) for _, s in records]
    print(f"protlm generate: {len(records)} sequences ({min(lengths)}-{max(lengths)} residues, "
          f"{how}) → {args.output}", file=sys.stderr)
    return 0
