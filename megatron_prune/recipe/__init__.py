"""Recipes: a YAML list of subcommands (``load``), each stamped when it finishes (``stamps``) so
a rerun skips what is done and re-runs what changed (``runner``)."""
