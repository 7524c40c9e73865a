"""Downstream probes: the ProtTrans heads, their data sets, metrics and training.

Modules:
  heads      SS CNN, per-protein FNN, light attention (REFERENCE.md §4), Flax
  datasets   NetSurfP-2.0 CSV, DeepLoc FASTA, sidechainnet/ProteinNet CASP12,
             SCL2205 loaders; task specs; the probe-test FASTA for --exclude
  features   one-hot / composition baselines, model and HDF5 embeddings
  metrics    Q3/Q8 (all residues and per-protein mean), Qn/Q2, MCC, ±1.96 SE
  train      bucketed batches, AdamW with early stopping, prediction
  evaluate   a task end to end → result.json, results.md, learning_curve.png
  hook       the trainer hook that probes the live encoder every N steps
"""
