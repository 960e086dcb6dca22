"""Pure model definitions: each module has Config, init, forward, coupled_groups, from_hf, to_hf."""
