"""Data: FASTA/FFindex readers, Beam prepare, vocabularies, seqio preprocessors and
feature converters, data sources (one data-dir setting), fetch of the real data sets,
task inspection and the training input pipeline."""
