"""Which megatron-core versions this tool runs on, checked before any work.

The CPU shim (``accelerator.py``) redirects named megatron-core internals, and
``distill/state.py`` works around three behaviours of megatron-core's distributed optimizer;
both were checked against the versions below only (the test suite runs on the pinned one). On
any other version they could misbehave silently, so they refuse with the way out instead.
``MEGATRON_PRUNE_ALLOW_UNTESTED_MEGATRON=1`` skips the check, at the user's risk.
"""

from __future__ import annotations

import os

from megatron_prune.errors import UserError

CHECKED_MEGATRON_CORE = ("0.16.1",)
ALLOW_ENV = "MEGATRON_PRUNE_ALLOW_UNTESTED_MEGATRON"


def megatron_core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH (Megatron-LM's own tree)
        import megatron.core

        return getattr(megatron.core, "__version__", "unknown")


def check_megatron_core() -> None:
    """Refuse a megatron-core this tool was not checked against."""
    found = megatron_core_version()
    if found in CHECKED_MEGATRON_CORE or os.environ.get(ALLOW_ENV) == "1":
        return
    raise UserError(
        f"megatron-core {found} is installed, but megatron-prune is checked against "
        f"{', '.join(CHECKED_MEGATRON_CORE)} only: pip install megatron-core=="
        f"{CHECKED_MEGATRON_CORE[-1]} (or set {ALLOW_ENV}=1 to try anyway)"
    )
