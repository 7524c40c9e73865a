"""The 20 standard amino acids: biophysical groups and property scales.

* Groups as the ProtTrans amino-acid panel colours them: hydrophobic
  aliphatic, aromatic, positively and negatively charged, polar (neutral),
  and the special residues C, G, P.
* Hydropathy: Kyte & Doolittle (1982), J. Mol. Biol. 157:105, Table 2.
* Volume: Zamyatnin (1972), Prog. Biophys. Mol. Biol. 24:107, residue
  volumes in cubic ångström.
* Charge: the side chain's net charge at pH 7 (D, E -1; K, R +1; H +0.1,
  its imidazole being about 10 % protonated at pH 7 with a pKa near 6).
"""

from __future__ import annotations

from typing import Dict

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"

GROUPS: Dict[str, str] = {
    **{a: "hydrophobic (aliphatic)" for a in "AILMV"},
    **{a: "aromatic" for a in "FWY"},
    **{a: "positive" for a in "HKR"},
    **{a: "negative" for a in "DE"},
    **{a: "polar" for a in "NQST"},
    **{a: "special" for a in "CGP"},
}
GROUP_ORDER = ("hydrophobic (aliphatic)", "aromatic", "positive", "negative", "polar", "special")
GROUP_COLOURS = {"hydrophobic (aliphatic)": "#e69f00", "aromatic": "#8b4513",
                 "positive": "#0072b2", "negative": "#d55e00", "polar": "#009e73",
                 "special": "#7f7f7f"}

KYTE_DOOLITTLE = {"A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5,
                  "G": -0.4, "H": -3.2, "I": 4.5, "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8,
                  "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9, "Y": -1.3, "V": 4.2}
VOLUME = {"A": 88.6, "R": 173.4, "N": 114.1, "D": 111.1, "C": 108.5, "Q": 143.8, "E": 138.4,
          "G": 60.1, "H": 153.2, "I": 166.7, "L": 166.7, "K": 168.6, "M": 162.9, "F": 189.9,
          "P": 112.7, "S": 89.0, "T": 116.1, "W": 227.8, "Y": 193.6, "V": 140.0}
CHARGE = {a: 0.0 for a in AMINO_ACIDS}
CHARGE.update({"D": -1.0, "E": -1.0, "K": 1.0, "R": 1.0, "H": 0.1})

PROPERTIES: Dict[str, Dict[str, float]] = {
    "hydrophobicity": KYTE_DOOLITTLE, "volume": VOLUME, "charge": CHARGE}

assert set(GROUPS) == set(AMINO_ACIDS) and all(set(p) == set(AMINO_ACIDS)
                                                for p in PROPERTIES.values())
