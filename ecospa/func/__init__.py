"""Pure models: each family module has Config, init, forward, coupled_groups (registry: ``families``).

The Hugging Face converters are in ``ecospa.io.hf_llama`` / ``ecospa.io.hf_gpt2`` / ``ecospa.io.hf_vit`` (``func`` imports nothing from ``io``)."""
