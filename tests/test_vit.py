"""ViT / DeiT: the functional forward equals transformers' image classifiers (loaded from a state
dict and from a directory written by transformers), pruning by slicing equals masking, and a
pruned tree exported padded loads in stock transformers with the same logits."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ecospa  # noqa: E402
from ecospa.func import decode as dec  # noqa: E402
from ecospa.func import vit  # noqa: E402
from ecospa.func.padding import compact, pad  # noqa: E402
from ecospa.io import hf_vit  # noqa: E402
from ecospa.io.hf import load_hf, save_hf  # noqa: E402
from ecospa.jobs.export import export  # noqa: E402
from strategies import random_scores  # noqa: E402
from tolerances import EXACT, HF, close  # noqa: E402

DTYPES = [torch.float64, torch.float32]
KINDS = {  # name -> (transformers config class, model class)
    "vit": ("ViTConfig", "ViTForImageClassification"),
    "deit": ("DeiTConfig", "DeiTForImageClassification"),
    "deit_teacher": ("DeiTConfig", "DeiTForImageClassificationWithTeacher"),
}


def hf_model(kind: str, dtype=torch.float64, **kw):
    conf_cls, model_cls = (getattr(transformers, n) for n in KINDS[kind])
    conf = conf_cls(**{**dict(image_size=8, patch_size=4, num_channels=3, hidden_size=12,
                              num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
                              num_labels=5), **kw})
    torch.manual_seed(0)
    model = model_cls(conf).eval()
    with torch.no_grad():  # random values everywhere (norms and biases too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype)


def images(dtype, seed=1, channels=3, size=8):
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def hf_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_forward_matches_transformers_from_state_dict_and_directory(tmp_path, kind, dtype):
    model = hf_model(kind, dtype)
    x = images(dtype)
    ref = hf_logits(model, x)
    cfg, params = hf_vit.from_hf(model.state_dict(), model.config)  # transformers-5 names
    assert cfg.distillation == kind.startswith("deit") and cfg.teacher_head == (kind == "deit_teacher")
    assert ref.shape == (2, 5)
    close(vit.forward(params, x, cfg), ref, HF)
    model.save_pretrained(tmp_path)  # the on-disk names (what the hub holds)
    name, cfg2, params2 = load_hf(str(tmp_path), dtype=dtype)
    assert name == "vit" and cfg2 == cfg
    close(vit.forward(params2, x, cfg2), ref, HF)
    # and back: to_hf writes what transformers loads, the same logits
    save_hf(params2, cfg2, str(tmp_path / "back"))
    back = getattr(transformers, KINDS[kind][1]).from_pretrained(tmp_path / "back").eval()
    close(hf_logits(back, x), ref, HF)


def test_qkv_bias_false_loads_as_zero_biases():
    model = hf_model("vit", qkv_bias=False)
    cfg, params = hf_vit.from_hf(model.state_dict(), model.config)
    assert all(not p["bq"].any() and not p["bk"].any() and not p["bv"].any() for p in params["layers"])
    x = images(torch.float64)
    close(vit.forward(params, x, cfg), hf_logits(model, x), HF)


def _prune(params, cfg, seed, sparsity=0.5):
    groups = vit.coupled_groups(cfg)
    keep = ecospa.select(params, groups, random_scores(params, groups, seed), sparsity=sparsity)
    return ecospa.slice_units(params, groups, keep), ecospa.mask(params, groups, keep)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["vit", "deit_teacher"])
def test_pruned_equals_masked_and_exports_padded_to_stock_transformers(tmp_path, kind, dtype):
    model = hf_model(kind, dtype)
    cfg, params = hf_vit.from_hf(model.state_dict(), model.config)
    x = images(dtype, seed=2)
    small, masked = _prune(params, cfg, seed=3)
    assert small["layers"][0]["wq"].shape[-1] < params["layers"][0]["wq"].shape[-1]
    ours = vit.forward(small, x, cfg)
    close(ours, vit.forward(masked, x, cfg), EXACT)
    assert not torch.allclose(ours, vit.forward(params, x, cfg))  # pruning did change the function
    with pytest.raises(ValueError, match="pruned .* export it padded"):
        hf_vit.to_hf(small, cfg)
    out = export(small, cfg, tmp_path / "hf", "hf-padded")["path"]
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == [KINDS[kind][1]]
    hf = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(hf).__name__ == KINDS[kind][1] and hf.dtype == dtype
    close(hf_logits(hf, x), ours, HF)
    # and back: load the padded directory, compact it, the same logits at the pruned sizes
    _, pcfg, padded = load_hf(out, dtype=dtype)
    back = compact(padded, pcfg)
    assert [p["wq"].shape for p in back["layers"]] == [p["wq"].shape for p in small["layers"]]
    close(vit.forward(back, x, cfg), ours, EXACT)


def test_pad_is_dense_shaped_and_exact():
    cfg = vit.Config(image_size=6, patch_size=3, n_channels=2, dim=6, n_layers=2, n_heads=2,
                     ffn_dim=7, n_classes=3, distillation=True, init_std=0.3)
    params = vit.init(cfg, seed=4, dtype=torch.float64)
    small, _ = _prune(params, cfg, seed=5, sparsity=0.6)
    padded, pcfg = pad(small, cfg)
    assert pcfg == cfg
    assert {k: v.shape for k, v in padded["layers"][1].items()} == \
        {k: v.shape for k, v in params["layers"][1].items()}
    x = images(torch.float64, channels=2, size=6)
    close(vit.forward(padded, x, pcfg), vit.forward(small, x, cfg), EXACT)


def test_patch_embedding_is_the_convolution():
    cfg = vit.Config(image_size=6, patch_size=3, n_channels=2, dim=4, n_heads=2)
    params = vit.init(cfg, seed=0, dtype=torch.float64)
    x = images(torch.float64, channels=2, size=6)
    w = params["w_patch"].T.reshape(4, 2, 3, 3)
    conv = torch.nn.functional.conv2d(x, w, params["b_patch"], stride=3).flatten(2).transpose(1, 2)
    emb = vit.embed(params, x, None, cfg)
    close(emb[:, 1:], conv + params["pos"][1:])
    close(emb[:, 0], (params["cls"] + params["pos"][0]).expand(2, -1))


def test_attention_is_bidirectional():
    """The first token's output depends on the last patch (a causal model's would not)."""
    cfg = vit.Config(image_size=4, patch_size=2, dim=4, n_heads=2, init_std=0.5)
    params = vit.init(cfg, seed=0, dtype=torch.float64)
    x = images(torch.float64, channels=1, size=4)
    y = x.clone()
    y[..., 2:, 2:] += 1.0  # only the last patch changes
    assert not torch.allclose(vit.forward(params, x, cfg), vit.forward(params, y, cfg))


@pytest.mark.parametrize("bad, words", [
    (lambda: torch.zeros(2, 3, 8, 8, dtype=torch.long), "floating-point"),
    (lambda: torch.zeros(2, 3, 8, 6), r"\[B, 3, 8, 8\].*square"),
    (lambda: torch.zeros(2, 1, 8, 8), r"\[B, 3, 8, 8\]"),
    (lambda: torch.zeros(3, 8, 8), r"\[B, 3, 8, 8\]"),
])
def test_bad_images_are_one_clear_error(bad, words):
    cfg = vit.Config(image_size=8, patch_size=4, n_channels=3, dim=4, n_heads=2)
    with pytest.raises(ValueError, match=words):
        vit.forward(vit.init(cfg), bad(), cfg)


@pytest.mark.parametrize("conf, words", [
    (dict(hidden_act="gelu_new"), "hidden_act 'gelu_new' is not supported"),
    (dict(image_size=[8, 12]), "only square images"),
    (dict(patch_size=[4, 2]), "only square images"),
    (dict(image_size=10), "image_size=10 must be a multiple of patch_size=4"),
    (dict(num_hidden_layers="2"), "'num_hidden_layers' must be a whole number"),
    (dict(model_type="bert"), "model_type 'bert' is not ViT or DeiT"),
])
def test_unsupported_configs_are_one_clear_error(conf, words):
    model = hf_model("vit")
    with pytest.raises(ValueError, match=words):
        hf_vit.from_hf(model.state_dict(), {**model.config.to_dict(), **conf})


def test_a_checkpoint_without_a_classifier_is_refused():
    model = hf_model("vit")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    with pytest.raises(ValueError, match="no image classifier"):
        hf_vit.from_hf(sd, model.config)
    with pytest.raises(ValueError, match="teacher_head=True needs distillation=True"):
        vit.Config(teacher_head=True)


def test_an_encoder_has_no_decoding():
    cfg = vit.Config(dim=4, n_heads=2)
    with pytest.raises(ValueError, match="'vit' family is an encoder"):
        dec.init_cache(vit.init(cfg), cfg, 1, 4)
    with pytest.raises(ValueError, match="'vit' family is an encoder"):
        dec.decode(vit.init(cfg), {"layers": ()}, torch.zeros(1, 1, 8, 8), 0, cfg)
    with pytest.raises(ValueError, match="'vit' family is an encoder"):
        dec.compiled_decoder(cfg, backend="eager")


def test_pruned_tree_round_trips_through_a_checkpoint(tmp_path):
    from ecospa.io import checkpoint
    cfg = vit.Config(dim=6, n_heads=3, ffn_dim=5, distillation=True, teacher_head=True, init_std=0.3)
    small, _ = _prune(vit.init(cfg, seed=2, dtype=torch.float64), cfg, seed=1)
    checkpoint.save(str(tmp_path / "ck"), small, cfg)
    params, cfg2, _ = checkpoint.load(str(tmp_path / "ck"))
    assert cfg2 == cfg
    x = images(torch.float64, channels=1)
    close(vit.forward(params, x, cfg2), vit.forward(small, x, cfg), EXACT)


def test_cli_exports_a_transformers_vit_directory_padded(tmp_path):
    """`ecospa export --format hf-padded` reads a ViT directory written by transformers (no
    tokenizer) and writes one transformers loads with the same logits; a pruned checkpoint too."""
    from ecospa import cli
    from ecospa.io import checkpoint
    model = hf_model("vit", torch.float32)
    model.save_pretrained(tmp_path / "src")
    assert cli.main(["export", "--model", str(tmp_path / "src"), "--format", "hf-padded",
                     "--out", str(tmp_path / "out")]) == 0
    x = images(torch.float32)
    back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    close(hf_logits(back, x), hf_logits(model, x), HF)
    cfg, params = hf_vit.from_hf(model.state_dict(), model.config)
    small, _ = _prune(params, cfg, seed=7)
    checkpoint.save(str(tmp_path / "ck"), small, cfg)
    assert cli.main(["export", "--model", str(tmp_path / "ck"), "--format", "hf-padded",
                     "--out", str(tmp_path / "out2")]) == 0
    back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out2").eval()
    close(hf_logits(back, x), vit.forward(small, x, cfg), HF)
