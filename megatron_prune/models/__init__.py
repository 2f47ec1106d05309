"""Megatron-Core GPT models for the supported families: architecture records (``arch``), layer
specs (``spec``), builders (``gpt``) and weight tables (``families``). Nothing here creates
process groups or touches checkpoints."""
