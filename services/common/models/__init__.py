"""Hugging Face causal LMs: loading one from a model reference (folder, .gguf file or shipped model), and
batched decoding with top-k logprobs, shared by the local teacher and the trainer."""
