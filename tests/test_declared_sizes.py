"""Loaders account for every tensor and every declared size (issue 23, item 9): a config.json
that names fewer or more layers than the weights hold, and a GGUF file whose header, tensor
infos and data section disagree, are errors naming the file and the mismatch, never a model."""
from __future__ import annotations

import json
import os

import pytest

import ecospa
from ecospa import cli
from ecospa.func import llama
from ecospa.io.load import load_model
from strategies import random_scores


# --- hf-compact: config.json layers vs the tensors ------------------------------------------------

CFG = llama.Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, init_std=0.2)
LISTS = ("layer_qk_pairs", "layer_v_dims", "layer_ffn_dims")


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    """A 3-layer pruned model's hf-compact export (per-layer sizes differ)."""
    pytest.importorskip("transformers")
    from ecospa.jobs.export import export
    params = llama.init(CFG, seed=1)
    groups = llama.coupled_groups(CFG)
    small = ecospa.pruner(groups, budget=0.5)(params, random_scores(params, groups, 1))
    return export(small, CFG, tmp_path_factory.mktemp("c") / "compact", "hf-compact")["path"]


def _edited_copy(src, dst, layers: int) -> str:
    """``src`` with config.json declaring ``layers`` layers (the per-layer lists cut or extended
    to match, so only the count disagrees with the tensors)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    with open(os.path.join(dst, "config.json")) as f:
        conf = json.load(f)
    conf["num_hidden_layers"] = layers
    for key in LISTS:
        conf[key] = (conf[key] * layers)[:layers]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(conf, f)
    return str(dst)


@pytest.mark.parametrize("layers", [2, 4])
def test_compact_config_layer_count_must_match_the_tensors(compact_dir, tmp_path, layers):
    bad = _edited_copy(compact_dir, tmp_path / "bad", layers)
    with pytest.raises(ValueError) as err:
        load_model(bad)
    text = str(err.value)
    assert os.path.join(bad, "config.json") in text
    assert f"num_hidden_layers = {layers}" in text and "3 layers" in text
    assert "set num_hidden_layers" in text  # how to fix it
    load_model(compact_dir)  # the intact export still loads


def test_cli_reports_a_truncating_compact_config_in_one_line(compact_dir, tmp_path, capsys):
    bad = _edited_copy(compact_dir, tmp_path / "bad", 2)
    rc = cli.main(["export", "--model", bad, "--format", "hf-padded", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert "config.json" in err and "num_hidden_layers = 2" in err and "3 layers" in err
