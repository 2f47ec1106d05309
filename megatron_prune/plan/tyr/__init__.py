"""Tyr-the-Pruner (``plan --strategy tyr``): a local OBS pruner with least-squares refit
(``local_pruner``), a supernet of per-layer variants on disk (``supernet``), a budget-conserving
(1+lambda) evolutionary search (``search``) and the job that runs them on the model (``job``)."""
