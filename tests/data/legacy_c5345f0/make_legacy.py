"""Run with the code of c5345f0 (before the family interface): writes MODEL_DIRs in
that metadata format, their HF exports, and the embeddings that code computes."""
import dataclasses, gzip, json, os, sys, shutil
import numpy as np
import jax, jax.numpy as jnp
import protlm_jax
assert os.path.exists(os.path.join(os.path.dirname(protlm_jax.__file__), "hf_t5.py")), \
    "run with the code of c5345f0 first on PYTHONPATH"
from protlm_jax import embed, hf_export, objectives, objectives_ae, optimizers, trainer
from protlm_jax.checkpoints import Checkpointer
from protlm_jax.models import bert, build_model, electra, t5

out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
seqs = []
with gzip.open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "data", "sample", "uniprot_sample.fasta.gz"), "rt") as f:
    name, buf = None, []
    for line in f:
        if line.startswith(">"):
            if name: seqs.append((name, "".join(buf)))
            name, buf = line[1:].split()[0], []
        else:
            buf.append(line.strip())
seqs = [s for s in seqs if 30 <= len(s[1]) <= 60][:2]
small = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, max_position_embeddings=128)
runs = {"t5": (t5.preset("prot_t5_tiny", d_model=16, num_heads=2, d_kv=8, d_ff=32), objectives.EncDecObjective(), {"encoder_input_tokens": 64, "decoder_input_tokens": 64, "decoder_target_tokens": 64}),
        "electra": (electra.ElectraConfig(discriminator=bert.BertConfig(family="electra", num_hidden_layers=2, embedding_size=8, vocab_pad_to_multiple=8, **small), generator=bert.BertConfig(family="electra", num_hidden_layers=1, embedding_size=8, vocab_pad_to_multiple=8, **{**small, "hidden_size": 8})), objectives_ae.ElectraObjective(), {"encoder_input_tokens": 64}),
        "albert": (bert.preset("prot_albert_tiny", embedding_size=8, **small), objectives_ae.MLMObjective(), {"encoder_input_tokens": 64})}
expected = {}
for fam, (cfg, objective, lengths) in runs.items():
    model, init_inputs = build_model(cfg)
    tc = trainer.TrainConfig(model_dir=f"{out}/{fam}", batch_size=8, train_steps=1)
    run = trainer.Trainer(model=model, objective=objective, optimizer_config=optimizers.OptimizerConfig(),
                          config=tc, model_feature_lengths=lengths, init_inputs=init_inputs)
    state = run.init_state()
    # perturb so biases/norms are not trivial
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    state = state.replace(params=jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    ck = Checkpointer(tc.model_dir, async_save=False)
    ck.save(1, state, {"step": 1, "data_batches_consumed": 1, "seed": 0, "train_config": dataclasses.asdict(tc),
                       "model_config": dataclasses.asdict(cfg), "task": "uniprot_sample_mlm",
                       "feature_lengths": {"inputs": 64}, "gin_config": ""})
    ck.close()
    e = embed.load_model(tc.model_dir)
    for ident, arr in e.embed(seqs, layers=(0, 1, -1)):
        expected[f"{fam}/model_dir/{ident}"] = arr
    hf_dir = f"{out}/{fam}_hf"
    hf_export.export_hf(tc.model_dir, hf_dir, encoder_only=(fam == "t5"))
    e = embed.load_model(hf_dir)
    for ident, arr in e.embed(seqs, layers=(0, 1, -1)):
        expected[f"{fam}/hf/{ident}"] = arr
np.savez_compressed(f"{out}/expected_embeddings.npz", **expected)
with open(f"{out}/sequences.json", "w") as f:
    json.dump(seqs, f)
print("done", sorted(expected)[:3], len(expected))
