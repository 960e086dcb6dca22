"""Reading and writing checkpoints in other ecosystems' formats (Hugging Face, GGUF)."""
