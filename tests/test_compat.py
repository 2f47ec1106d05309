"""megatron-core versions the CPU shim and optimizer workarounds were not checked against are
refused before any work, with the way out; the installed (pinned) one passes."""

import pytest

from megatron_prune import compat
from megatron_prune.errors import UserError


def test_the_pinned_megatron_core_passes():
    assert compat.megatron_core_version() in compat.CHECKED_MEGATRON_CORE
    compat.check_megatron_core()


def test_an_unchecked_megatron_core_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "megatron_core_version", lambda: "0.11.0")
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    with pytest.raises(UserError, match=r"megatron-core 0.11.0 .* pip install megatron-core=="):
        compat.check_megatron_core()
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    compat.check_megatron_core()  # the user's explicit choice
