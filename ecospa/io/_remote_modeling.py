# Copied verbatim into every compact export as modeling_ecospa.py (loaded by transformers with
# trust_remote_code=True). Self-contained: imports only torch and transformers.
"""A LLaMA-family decoder whose layers have their own sizes (ecospa's compact pruned layout).

Per layer ``i``: ``layer_qk_pairs[i]`` rotary pairs per head (queries and keys), their own
frequencies (the persistent buffer ``self_attn.inv_freq [n_kv_heads, pairs]``, kept from the
original table), ``layer_v_dims[i]`` value dims per head and ``layer_ffn_dims[i]`` MLP neurons.
Scores are scaled by 1/sqrt(head_dim) of the ORIGINAL model. Rotary pairs use the rotate-half
layout: dim p of a head pairs with dim p + pairs. Works with ``generate()`` and the default
dynamic cache (each layer's cache takes the shapes of its own keys and values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


# transformers 5 maps tied parameter names to their source; 4.x lists them
_TIED = ({"lm_head.weight": "model.embed_tokens.weight"}
         if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"])
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class EcospaLlamaConfig(PretrainedConfig):
    model_type = "ecospa_llama"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=None, head_dim=None, layer_qk_pairs=None, layer_v_dims=None,
                 layer_ffn_dims=None, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=2048, attention_bias=False, initializer_range=0.02,
                 use_cache=True, qk_norm=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        n = num_hidden_layers
        self.layer_qk_pairs = list(layer_qk_pairs or [self.head_dim // 2] * n)
        self.layer_v_dims = list(layer_v_dims or [self.head_dim] * n)
        self.layer_ffn_dims = list(layer_ffn_dims or [4 * hidden_size] * n)
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.qk_norm = qk_norm  # Qwen3: per-head q/k RMSNorm over the ORIGINAL head_dim, before RoPE
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(**kwargs)


class EcospaRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class EcospaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        D, H, Hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.H, self.Hkv, self.G = H, Hkv, H // Hkv
        self.P = config.layer_qk_pairs[layer_idx]
        self.Dv = config.layer_v_dims[layer_idx]
        self.scale = config.head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, H * 2 * self.P, bias=bias)
        self.k_proj = nn.Linear(D, Hkv * 2 * self.P, bias=bias)
        self.v_proj = nn.Linear(D, Hkv * self.Dv, bias=bias)
        self.o_proj = nn.Linear(H * self.Dv, D, bias=False)
        self.register_buffer("inv_freq", torch.zeros(Hkv, self.P, dtype=torch.float32), persistent=True)
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        if self.qk_norm:  # one [head_dim] weight for all heads; each head reads its kept pairs' slots
            self.head_dim, self.eps = config.head_dim, config.rms_norm_eps
            self.q_norm = EcospaRMSNorm(config.head_dim, config.rms_norm_eps)  # its .weight only
            self.k_norm = EcospaRMSNorm(config.head_dim, config.rms_norm_eps)
            self.register_buffer("qk_slots", torch.zeros(Hkv, self.P, dtype=torch.long), persistent=True)

    def _head_norm(self, x, weight, heads_per_slot):
        """x [B, heads, T, 2P]: RMSNorm per head with the divisor the ORIGINAL head_dim."""
        w = weight.view(2, -1)[:, self.qk_slots].transpose(0, 1)  # [Hkv, 2, P]
        w = w.repeat_interleave(heads_per_slot, dim=0).reshape(1, -1, 1, 2 * self.P)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / self.head_dim + self.eps)
        return w * xf.to(x.dtype)

    def _rotate(self, x, pos, heads_per_freq):
        freq = self.inv_freq.to(torch.promote_types(x.dtype, torch.float32))
        freq = freq.repeat_interleave(heads_per_freq, dim=0)  # [heads, P]
        ang = pos.to(freq.dtype)[:, None, :, None] * freq[None, :, None, :]  # [B, heads, T, P]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x0, x1 = x[..., :self.P], x[..., self.P:]
        return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)

    def forward(self, x, position_ids, past_key_values=None, attention_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, 2 * self.P).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.Hkv, 2 * self.P).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.Hkv, self.Dv).transpose(1, 2)
        if self.qk_norm:
            q, k = self._head_norm(q, self.q_norm.weight, self.G), self._head_norm(k, self.k_norm.weight, 1)
        q = self._rotate(q, position_ids, self.G)
        k = self._rotate(k, position_ids, 1)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        S = k.shape[2]
        k = k.repeat_interleave(self.G, dim=1)
        v = v.repeat_interleave(self.G, dim=1)
        idx = torch.arange(S, device=x.device)  # cache slots; the new queries are the last T
        allowed = (idx[None, :] <= idx[S - T:, None])[None].expand(B, T, S)  # causal [B, T, S]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, -S:].bool()
        allowed = allowed[:, None]  # [B, 1, T, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scale)
        out = torch.where(allowed.any(-1, keepdim=True), out, torch.zeros_like(out))  # fully padded rows
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.Dv))


class EcospaMLP(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        D, F_ = config.hidden_size, config.layer_ffn_dims[layer_idx]
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EcospaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = EcospaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EcospaAttention(config, layer_idx)
        self.post_attention_layernorm = EcospaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = EcospaMLP(config, layer_idx)

    def forward(self, x, position_ids, past_key_values=None, attention_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), position_ids, past_key_values, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EcospaPreTrainedModel(PreTrainedModel):
    config_class = EcospaLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["EcospaDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class EcospaLlamaModel(EcospaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(EcospaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = EcospaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None):
        x = self.embed_tokens(input_ids)
        B, T = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, -1)
        for layer in self.layers:
            x = layer(x, position_ids, past_key_values if use_cache else None, attention_mask)
        return self.norm(x), past_key_values


class EcospaLlamaForCausalLM(EcospaPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = EcospaLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    _tied_weights_keys = _TIED

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, return_dict=None, **kwargs):
        # transformers 5 calls the cache `cache`; 4.x calls it `past_key_values`
        past_key_values = past_key_values if past_key_values is not None else kwargs.get("cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if position_ids is None and attention_mask is not None:  # left padding shifts positions
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        h, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
