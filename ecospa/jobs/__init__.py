"""The jobs on a model, as library code (no argparse): compress, evaluate, generate, export, the lm-eval adapter."""
