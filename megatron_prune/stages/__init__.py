"""The stages behind the Python API (:mod:`megatron_prune.api`): each reads files, does its work
on this rank's share of the model and writes files atomically."""
