"""Files in and out: checkpoints, Hugging Face and GGUF formats, text data and tokenizers, model loading (``load``)."""
