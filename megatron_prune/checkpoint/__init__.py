"""Checkpoint IO: Hugging Face folders, GGUF files and Megatron distributed checkpoints."""
