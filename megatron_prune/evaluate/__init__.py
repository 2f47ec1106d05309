"""Evaluation: pipeline-aware forward passes, perplexity, greedy generation."""
