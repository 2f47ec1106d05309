"""The Ascend NPU branches against a fake torch_npu, in a pytest process of their own.

The fake renames torch's privateuse1 device to "npu" and registers an "hccl" backend, which
cannot be undone within a process and breaks the tests that follow it there; the checks live in
``tests/npu_branch_checks.py`` (see its docstring for what they assert).
"""

import subprocess
import sys

from tests.helpers import REPO, _env


def test_npu_branches_against_a_fake_torch_npu():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/npu_branch_checks.py"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-2000:]
