"""``protlm analyze``: reproducible numbers, a permutation test that behaves, the
SCL2205 composition baseline above the majority class, pictures that open
(PNG, and the HTML in headless Chromium), one-line errors on bad input.

Real data: the bundled UniProt sample (contextual view) and SCL2205 (fetched);
the model is a tiny random-init MODEL_DIR (the numbers of the demo model and
AntiBERTy are in the README).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import h5py
import matplotlib.image
import numpy as np
import pytest

from protlm_jax import cli
from protlm_jax.analyze import aminoacids, properties, proteins, stats
from protlm_jax.embed import io as embed_io

from conftest import REPO, random_model_dir, read_sample_records

FETCHED = os.path.join(REPO, "data", "fetched")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("t5") / "model", "t5", "prot_t5_tiny")


@pytest.fixture(scope="module")
def scl():
    if not os.path.exists(os.path.join(FETCHED, "scl2205", "scl2205.csv")):
        pytest.skip("probe data not fetched: run `make data`")
    return proteins.task_proteins("scl2205", FETCHED)


def _cli(capsys, *argv):
    code = cli.main(["analyze", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines()
                                if line.startswith("protlm")]


def test_aminoacids_numbers_follow_the_seed_and_the_files_open(model_dir, tmp_path, capsys):
    options = dict(proteins=30, methods=("pca", "tsne"), permutations=199)
    code, out, err = _cli(capsys, "aminoacids", "--model", model_dir, "--output", tmp_path / "a",
                          "--method", "pca", "tsne", "--proteins", 30, "--permutations", 199)
    assert code == 0, err
    runs = {"a": json.loads((tmp_path / "a" / "aminoacids.json").read_text())}
    assert json.loads(out.splitlines()[-1]) == runs["a"]["correlations"]
    # The library call the CLI makes, on one embedder (its programs compiled once).
    embedder = embed_io.load_model(model_dir)
    for name, seed in (("b", 0), ("c", 1)):
        runs[name] = aminoacids.analyze(embedder, str(tmp_path / name), fasta=runs["a"]["fasta"],
                                        seed=seed, model_name="model", **options)
        assert runs[name] == json.loads((tmp_path / name / "aminoacids.json").read_text())
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a == b  # the same seed: the same numbers, to the digit
    assert (tmp_path / "a" / "aminoacids_points.csv").read_text() == \
        (tmp_path / "b" / "aminoacids_points.csv").read_text()
    for view in ("input", "contextual"):
        for w in ("model", "random_init"):
            assert set(a["correlations"][view][w]) == {"hydrophobicity", "volume", "charge"}
        # The model's distances do not depend on the seed; the random init's do.
        assert a["correlations"][view]["model"]["volume"]["spearman"] == \
            c["correlations"][view]["model"]["volume"]["spearman"]
        assert a["correlations"][view]["random_init"] != c["correlations"][view]["random_init"]
    assert a["proteins"] == 30 and min(a["residues_per_amino_acid"].values()) > 0
    for method in ("pca", "tsne"):
        png = matplotlib.image.imread(tmp_path / "a" / f"aminoacids_{method}.png")
        assert png.shape[0] > 500 and png.std() > 0.05
        html = (tmp_path / "a" / f"aminoacids_{method}.html").read_text()
        assert "plotly" in html and "https://cdn" not in html.split("<body>")[0]
    with open(tmp_path / "a" / "aminoacids_points.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 20  # views x weights x methods x residues
    assert {r["group"] for r in rows if r["residue"] == "W"} == {"aromatic"}


def test_permutation_p_value_behaves(model_dir):
    embedder = embed_io.load_model(model_dir)
    dist = stats.pairwise(aminoacids.input_rows(embedder))
    hydro = np.array([properties.KYTE_DOOLITTLE[a] for a in properties.AMINO_ACIDS])
    # Shuffled labels: the null holds, p is uniform (mean 1/2, rarely below 0.05).
    rng = np.random.default_rng(0)
    ps = [stats.mantel(dist, rng.permutation(hydro), permutations=499, seed=i)["p_value"]
          for i in range(20)]
    assert 0.3 < np.mean(ps) < 0.7 and sum(p < 0.05 for p in ps) <= 3
    # Distances that are the property's own differences: rho 1, the smallest p.
    exact = stats.mantel(stats.pairwise(hydro[:, None], "euclidean"), hydro,
                         permutations=499, seed=0)
    assert exact["spearman"] == pytest.approx(1.0) and exact["p_value"] == 1 / 500
    again = stats.mantel(dist, hydro, permutations=499, seed=3)
    assert again == stats.mantel(dist, hydro, permutations=499, seed=3)


def test_scl2205_map_composition_knn_beats_the_majority_class(model_dir, scl, tmp_path,
                                                              capsys):
    code, out, err = _cli(capsys, "proteins", "--model", model_dir, "--task", "scl2205",
                          "--limit", 400, "--max_length", 400, "--method", "pca", "--random_init",
                          "--output", tmp_path, "--data_dir", FETCHED)
    assert code == 0, err
    result = json.loads((tmp_path / "proteins.json").read_text())
    assert json.loads(out.splitlines()[-1])["scores"] == result["scores"]
    assert result["points"] == result["labelled"] == 400 and result["unknown"] == 0
    assert result["left_out_longer_than_max_length"] == sum(
        len(s) > 400 for s in scl[1].values())
    comp = result["scores"]["composition"]
    assert comp["knn_accuracy"] > result["majority_accuracy"] + 0.05
    assert set(result["scores"]) == {"embeddings", "random_init", "composition"}
    assert -1 <= comp["silhouette"] <= 1 and -1 <= result["scores"]["embeddings"]["silhouette"]
    with open(tmp_path / "proteins_points.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 400 and all(scl[0][r["identifier"]] == r["label"] for r in rows)
    html = (tmp_path / "proteins_pca.html").read_text()
    assert rows[0]["identifier"] in html  # the hover text names each protein


def _h5(path, vectors):
    with h5py.File(path, "w") as f:
        for key, v in vectors.items():
            f.create_dataset(key, data=v)
    return path


def test_h5_with_labels_draws_unknowns_and_bad_input_is_one_line(scl, tmp_path, capsys):
    labels, seqs = scl
    ids = sorted(labels)[:60]
    h5 = _h5(tmp_path / "comp.h5", dict(zip(ids, stats.composition([seqs[i] for i in ids]))))
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("identifier,label\n" + "".join(f"{i},{labels[i]}\n" for i in ids[:50]))
    code, out, err = _cli(capsys, "proteins", "--embeddings", h5, "--labels", csv_path,
                          "--method", "tsne", "--perplexity", 10, "--output", tmp_path / "ok")
    assert code == 0, err
    result = json.loads((tmp_path / "ok" / "proteins.json").read_text())
    assert (result["points"], result["labelled"], result["unknown"]) == (60, 50, 10)
    assert "composition" not in result["scores"]  # no sequences given
    with open(tmp_path / "ok" / "proteins_points.csv") as f:
        assert sum(r["label"] == "UNKNOWN" for r in csv.DictReader(f)) == 10

    per_residue = _h5(tmp_path / "res.h5", {"P1": np.ones((5, 4), np.float32)})
    missing = tmp_path / "missing.csv"
    missing.write_text("identifier,label\n" + "".join(f"{i},{labels[i]}\n" for i in ids)
                       + "NOT_THERE,Nucleus\nALSO_NOT,Cytoplasm\n")
    cases = [
        (["--embeddings", per_residue, "--labels", csv_path], "not a per-protein vector"),
        (["--embeddings", tmp_path / "labels.csv", "--labels", csv_path], "cannot open as HDF5"),
        (["--embeddings", h5, "--labels", missing],
         "2 of 62 labelled ids are not in"),
        (["--embeddings", h5, "--labels", csv_path, "--perplexity", 60],
         "too few for t-SNE with perplexity 60"),
        (["--embeddings", h5, "--labels", h5], "not UTF-8"),
    ]
    for argv, message in cases:
        code, _, err = _cli(capsys, "proteins", *argv, "--output", tmp_path / "bad")
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    code, _, err = _cli(capsys, "aminoacids", "--model", tmp_path, "--output", tmp_path / "b")
    assert code == 2 and len(err) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="`make test` installs Debian's chromium")
def test_html_loads_in_headless_chromium(scl, tmp_path, capsys):
    labels, seqs = scl
    ids = sorted(labels)[:40]
    vectors = dict(zip(ids, stats.composition([seqs[i] for i in ids])))
    proteins.analyze(vectors, {i: labels[i] for i in ids}, str(tmp_path), methods=("pca",))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-quic",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1240,940",
                    "--virtual-time-budget=5000", f"--screenshot={shot}",
                    (tmp_path / "proteins_pca.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = matplotlib.image.imread(shot)[..., :3]
    # A rendered plot: mostly white page, plus coloured markers (not one flat colour).
    colours = {tuple(p) for p in (img.reshape(-1, 3) * 255).astype(int)[::7]}
    assert img.mean() > 0.8 and len(colours) > 20


def test_contextual_proteins_beyond_the_positions_are_passed_over_and_counted():
    records, longer = aminoacids.read_proteins(str(REPO / "data" / "sample" /
                                                   "uniprot_sample.fasta.gz"), 50, 200)
    expected = [s for _, s in read_sample_records()]
    short = [s for s in expected if len(s) <= 200][:50]
    assert [s for _, s in records] == short
    assert longer == sum(len(s) > 200 for s in expected[:expected.index(short[-1])])
