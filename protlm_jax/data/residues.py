"""The rare-residue rule, written once (REFERENCE §2).

Every ProtTrans model reads the rare residues U (selenocysteine), Z (Glx),
O (pyrrolysine) and B (Asx) as X. The readers keep them (and count them);
the seqio preprocessors, ``prepare``'s dedup digest, embedding's clean-up and
the Hugging Face usage snippet all map them with the names below. No
TensorFlow here: Beam workers and the FASTA tools import it cheaply.
"""

RARE_RESIDUES = "UZOB"
RARE_TO_X = str.maketrans(RARE_RESIDUES, "X" * len(RARE_RESIDUES))
RARE_RESIDUES_PATTERN = f"[{RARE_RESIDUES}]"
