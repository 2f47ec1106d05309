"""Allocation: how much to prune where. Turns (architecture, scores, budget, strategy) into a
:class:`~megatron_prune.plan.target.Target`, the per-layer target YAML that ``prune`` takes.

* ``target.py``: the target and its validation (``prune --target``), shared with ``surgery/``.
* ``cost.py``: parameters, FLOPs per token and an analytic latency proxy of a ``ModelArch``;
  budgets (``params=0.5``: keep half of the dense blocks' parameters).
* ``strategies.py``: ``uniform`` (one width ratio everywhere) and ``alpha`` (AlphaPruning's
  per-layer ratios from ESD alphas), both rounded to widths that are valid at the layout.
* ``planfile.py``: the plan file, a target plus a record of how it was made.

* ``tyr/``: Tyr-the-Pruner's supernet and evolutionary search (``--strategy tyr``).

Only ``tyr`` needs weights (it loads the model at the run's layout, one rank per shard); the
rest is arithmetic, so ``plan`` runs it in the launcher process. ``surgery/`` imports from here,
never the other way round.
"""
