"""Hypothesis strategies: draw model STRUCTURE and seeds, never tensor values. Sizes are bounded."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from ecospa.func import gpt2, llama, vit
from ecospa.func.families import FAMILIES, family_of


@st.composite
def llama_configs(draw):
    n_kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))  # query heads per KV head: 1 = MHA, n_kv = 1 = MQA
    pairs = draw(st.integers(1, 3))  # rotary pairs per head
    bias = draw(st.booleans())  # Qwen2-style q/k/v biases, or (no real model has both) Qwen3 q/k norms
    return llama.Config(vocab_size=11, dim=draw(st.integers(2, 10)), n_layers=draw(st.integers(1, 2)),
                        n_heads=n_kv * group, n_kv_heads=n_kv, head_dim=2 * pairs,
                        ffn_dim=draw(st.integers(1, 7)), tie_embeddings=draw(st.booleans()),
                        attention_bias=bias, rope_theta=draw(st.sampled_from([10.0, 1e4])),
                        qk_norm=not bias and draw(st.booleans()),
                        init_std=0.3)


@st.composite
def gpt2_configs(draw):
    heads = draw(st.integers(1, 3))
    return gpt2.Config(vocab_size=11, dim=heads * draw(st.integers(1, 3)), n_layers=draw(st.integers(1, 2)),
                       n_heads=heads, ffn_dim=draw(st.integers(1, 7)), max_seq_len=8, init_std=0.3)


@st.composite
def vit_configs(draw):
    heads = draw(st.integers(1, 3))
    patch = draw(st.integers(1, 3))
    distillation = draw(st.booleans())
    return vit.Config(image_size=patch * draw(st.integers(1, 2)), patch_size=patch,
                      n_channels=draw(st.integers(1, 2)), dim=heads * draw(st.integers(1, 3)),
                      n_layers=draw(st.integers(1, 2)), n_heads=heads, ffn_dim=draw(st.integers(1, 7)),
                      n_classes=draw(st.integers(1, 4)), norm_eps=1e-5, init_std=0.3,
                      distillation=distillation, teacher_head=distillation and draw(st.booleans()))


# Every family in ``ecospa.func.families.FAMILIES`` has an entry (test_families checks it), so the
# property tests that draw ``models()`` cover a new family as soon as it is registered.
FAMILY_CONFIGS = {"llama": (llama, llama_configs), "gpt2": (gpt2, gpt2_configs),
                  "vit": (vit, vit_configs)}


@st.composite
def models(draw, decoders: bool = False):
    """(module, cfg) for any family (``decoders=True``: causal LMs over token ids only, for
    tests of decoding or of a next-token loss)."""
    names = sorted(n for n in FAMILY_CONFIGS if FAMILIES[n].decoder or not decoders)
    module, configs = FAMILY_CONFIGS[draw(st.sampled_from(names))]
    return module, draw(configs())


seeds = st.integers(0, 2**16)

# A target: a fraction per group (including 0 and values that keep a single unit) or a budget.
fractions = st.one_of(st.just(0.0), st.just(0.99), st.floats(0.0, 0.95))
targets = st.one_of(
    st.builds(lambda s: {"sparsity": s}, fractions),
    st.builds(lambda q, v, m: {"sparsity": {"qk": q, "vo": v, "mlp": m}}, fractions, fractions, fractions),
    st.builds(lambda b: {"budget": b}, st.floats(0.0, 0.6)),
)


def random_scores(params, groups, seed: int) -> dict:
    """Scores from a seed (ties are likely with few units, which tests tie handling too)."""
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.randint(0, 5, g.sizes(params), generator=gen).double() for g in groups}


def _token_ids(cfg, gen, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)


def _images(cfg, gen, batch: int, length: int) -> torch.Tensor:
    """Unit-normal images [batch, C, S, S] (``length`` does not apply: the size is the model's)."""
    return torch.randn(batch, cfg.n_channels, cfg.image_size, cfg.image_size, generator=gen,
                       dtype=torch.float64)


# The input each family's forward takes, per family (every family has an entry).
FAMILY_INPUTS = {"llama": _token_ids, "gpt2": _token_ids, "vit": _images}


def tokens(cfg, seed: int, batch: int = 2, length: int = 5) -> torch.Tensor:
    """A batch of the family's input from a seed: token ids [batch, length] for a decoder,
    images for ViT (see ``FAMILY_INPUTS``)."""
    gen = torch.Generator().manual_seed(seed)
    return FAMILY_INPUTS[family_of(cfg).name](cfg, gen, batch, length)


@st.composite
def custom_groups(draw, max_groups: int = 2):
    """(params, groups) of hand-made coupled groups on float64 leaves of 1-4 axes, with the
    member axes in any order (block axis before OR after the unit axis, extra axes anywhere),
    single-block members without a block axis, unmasked members and both sides."""
    from ecospa.groups import Group, Member
    gen = torch.Generator().manual_seed(draw(seeds))
    params, groups = {}, []
    for gi in range(draw(st.integers(1, max_groups))):
        n_blocks, n_units = draw(st.integers(1, 3)), draw(st.integers(1, 5))
        members, leaves = [], {}
        n_members = draw(st.integers(1, 3))
        for mi in range(n_members):
            with_block = n_blocks > 1 or draw(st.booleans())
            n_extra = draw(st.integers(0, 2))
            sizes = [n_units] + ([n_blocks] if with_block else []) + [draw(st.integers(1, 3)) for _ in range(n_extra)]
            order = draw(st.permutations(range(len(sizes))))  # order[a] = which size sits at axis a
            shape = [sizes[order[a]] for a in range(len(sizes))]
            unit_axis = order.index(0)
            block_axis = order.index(1) if with_block else None
            side = "b" if mi == 0 else draw(st.sampled_from([None, "a", "b"]))
            masked = mi == 0 or draw(st.booleans())
            leaves[f"m{mi}"] = torch.randn(*shape, generator=gen, dtype=torch.float64)
            members.append(Member((f"g{gi}", f"m{mi}"), unit_axis, block_axis, side, masked))
        params[f"g{gi}"] = leaves
        groups.append(Group(f"g{gi}", draw(st.sampled_from(["qk", "vo", "mlp", "ffn"])), tuple(members)))
    return params, groups


def float_scores(params, groups, seed: int) -> dict:
    """Distinct (almost surely) positive float scores: ranks without ties."""
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.rand(g.sizes(params), generator=gen, dtype=torch.float64) + 1e-3 for g in groups}
