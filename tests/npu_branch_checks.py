"""The Ascend NPU branches, checked without an NPU or torch_npu.

A fake ``torch_npu`` package is written to a temporary folder and put on ``sys.path``, so the
code under test imports it as it would import the real one. Importing it does what importing
torch_npu does that megatron-prune relies on: torch's privateuse1 device is named "npu",
``torch.npu`` is set, and an "hccl" collective backend is registered (gloo underneath, so a
world of one really starts). Its functions record every call; ``npu_fusion_attention``
also computes its documented result (BNSD layout, compressed causal / band masks) with torch's
SDPA, so the layout handling around the call is checked too. Each test asserts what a branch
calls, with which arguments, against the conventions MindSpeed's own call sites use
(Ascend/MindSpeed, branch 26.1.0_core_r0.12.1, the one MindSpeed-LLM v26.1.0 runs).

The privateuse1 rename and the "hccl" registration are process-wide (torch allows each once
per process) and break later tests in the same process (torch then asks for NPU hooks that
the fake cannot register), so this file is not collected by the suite:
``tests/test_npu_branches.py`` runs it with pytest in a process of its own.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

_FAKE = {
    "torch_npu/__init__.py": '''
        """Fake torch_npu (tests/test_npu_branches.py)."""
        import torch
        import torch.distributed as dist

        from torch_npu import npu

        CALLS = npu.CALLS
        if torch._C._get_privateuse1_backend_name() != "npu":
            torch.utils.rename_privateuse1_backend("npu")
        torch.npu = npu


        def _hccl(store, rank, size, timeout):
            import sys

            sys.modules["torch_npu"].CALLS.append(("hccl_process_group", rank, size))
            return dist.ProcessGroupGloo(store, rank, size, timeout)


        if "hccl" not in dist.Backend.backend_list:
            # torch_npu registers devices=["npu"]; this fake's tensors live on the CPU
            dist.Backend.register_backend("hccl", _hccl, devices=["cpu"])


        def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None,
                                 padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0,
                                 pre_tockens=2147483647, next_tockens=2147483647,
                                 inner_precise=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, **rest):
            CALLS.append(("npu_fusion_attention", (query, key, value, head_num, input_layout),
                          dict(pse=pse, padding_mask=padding_mask, atten_mask=atten_mask,
                               scale=scale, keep_prob=keep_prob, pre_tockens=pre_tockens,
                               next_tockens=next_tockens, inner_precise=inner_precise,
                               sparse_mode=sparse_mode, **rest)))
            assert input_layout == "BNSD" and query.size(1) == head_num
            sq, sk = query.size(2), key.size(2)
            i = torch.arange(sq).unsqueeze(1)
            j = torch.arange(sk).unsqueeze(0)
            if sparse_mode == 2:  # leftUpCausal
                allowed = j <= i
            elif sparse_mode == 3:  # rightDownCausal
                allowed = j <= i + (sk - sq)
            elif sparse_mode == 4:  # band: pre_tockens before, next_tockens after the query
                assert sq == sk
                allowed = (j >= i - pre_tockens) & (j <= i + next_tockens)
            else:
                raise NotImplementedError(sparse_mode)
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed.to(query.device), scale=scale,
                enable_gqa=key.size(1) != head_num)
            return out, None, None, None, 0, 0, 0
        ''',
    "torch_npu/npu.py": """
        CALLS = []
        AVAILABLE = True


        def is_available():
            CALLS.append(("is_available",))
            return AVAILABLE


        def set_device(index):
            CALLS.append(("set_device", index))


        def device_count():
            return 8
        """,
    "torch_npu/contrib/__init__.py": "",
    "torch_npu/contrib/transfer_to_npu.py": """
        import torch_npu

        torch_npu.CALLS.append(("import", __name__))
        """,
}


def _forget_torch_npu() -> None:
    for name in [n for n in sys.modules if n == "torch_npu" or n.startswith("torch_npu.")]:
        del sys.modules[name]
    if hasattr(torch, "npu"):
        delattr(torch, "npu")


@pytest.fixture
def fake_torch_npu(tmp_path, monkeypatch):
    """The fake package, importable as ``torch_npu`` for one test, on a machine without CUDA."""
    for relative, text in _FAKE.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # an NPU node has no CUDA
    monkeypatch.delenv("MEGATRON_PRUNE_DEVICE", raising=False)
    _forget_torch_npu()
    importlib.invalidate_caches()
    fake = importlib.import_module("torch_npu")
    yield fake
    _forget_torch_npu()


@pytest.fixture
def no_torch_npu(monkeypatch):
    """torch_npu is not installed (as on this machine, but whatever the machine)."""
    _forget_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MEGATRON_PRUNE_DEVICE", raising=False)


def test_detect_picks_the_npu_and_hccl_when_torch_npu_sees_one(fake_torch_npu, monkeypatch):
    from megatron_prune.accelerator import Accelerator, detect

    assert detect() == Accelerator(kind="npu", backend="hccl")
    assert ("is_available",) in fake_torch_npu.CALLS
    assert detect("npu") == Accelerator(kind="npu", backend="hccl")
    monkeypatch.setenv("MEGATRON_PRUNE_DEVICE", "npu")
    assert detect().kind == "npu"


def test_npu_that_sees_no_device_is_refused(fake_torch_npu):
    from megatron_prune.accelerator import detect
    from megatron_prune.errors import UserError

    fake_torch_npu.npu.AVAILABLE = False
    assert detect().kind == "cpu"  # not chosen by detection
    with pytest.raises(UserError, match="torch_npu is missing or sees no NPU"):
        detect("npu")


def test_without_torch_npu_detection_falls_back_and_npu_is_refused(no_torch_npu):
    from megatron_prune.accelerator import detect
    from megatron_prune.errors import UserError

    assert detect().kind == "cpu"
    with pytest.raises(UserError, match="torch_npu is missing"):
        detect("npu")


def test_each_local_rank_gets_its_own_npu(fake_torch_npu, monkeypatch):
    from megatron_prune.accelerator import Accelerator
    from megatron_prune.distributed import model_device

    npu = Accelerator(kind="npu", backend="hccl")
    assert npu.device(3) == torch.device("npu", 3)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert model_device(npu) == torch.device("npu", 2)


def test_prepare_on_npu_loads_transfer_to_npu_and_not_the_cpu_shim(fake_torch_npu):
    """As MindSpeed does: torch_npu's CUDA-to-NPU bridge is imported; nothing of ours is
    patched."""
    from megatron_prune import accelerator

    was_applied = accelerator.shim_applied()
    accelerator.remove_cpu_shim()
    try:
        accel = accelerator.prepare("npu")
        assert (accel.kind, accel.backend) == ("npu", "hccl")
        assert ("import", "torch_npu.contrib.transfer_to_npu") in fake_torch_npu.CALLS
        assert not accelerator.shim_applied()
    finally:
        if was_applied:
            accelerator.apply_cpu_shim()


def test_npu_process_group_sets_the_device_first_then_starts_hccl(fake_torch_npu, monkeypatch):
    """init_torch_distributed on an NPU rank: torch.npu.set_device(local rank), then the default
    group on the "hccl" backend (HCCL binds to the current device, like NCCL)."""
    import torch.distributed as dist

    from megatron_prune.accelerator import Accelerator
    from megatron_prune.distributed import init_torch_distributed

    if dist.is_initialized():
        pytest.skip("a process group from another test is still up in this process")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "5"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    try:
        init_torch_distributed(Accelerator(kind="npu", backend="hccl"))
        calls = [c for c in fake_torch_npu.CALLS if c[0] in ("set_device", "hccl_process_group")]
        assert calls[:2] == [("set_device", 5), ("hccl_process_group", 0, 1)]
        assert dist.get_backend() == "hccl" and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _qkv(seq: int = 12, batch: int = 2, heads: int = 4, groups: int = 2, dim: int = 8):
    """[s, b, heads, d] query and [s, b, groups, d] key / value, as core attention gets them."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(seq, batch, heads, dim, generator=gen)
    k, v = (torch.randn(seq, batch, groups, dim, generator=gen) for _ in range(2))
    return q, k, v


def _sdpa_reference(q, k, v, allowed, scale):
    out = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=allowed, scale=scale,
        enable_gqa=True,
    )  # fmt: skip
    return out.permute(2, 0, 1, 3)


def _one_fusion_call(fake):
    calls = [c for c in fake.CALLS if c[0] == "npu_fusion_attention"]
    assert len(calls) == 1, calls
    return calls[0][1], calls[0][2]


def test_npu_fused_attention_is_called_as_mindspeed_calls_it(fake_torch_npu):
    """Causal attention with grouped keys: positional (query, key, value, head_num, layout) as
    MindSpeed's DotProductAttention adaptor passes them (flash_attention/adaptor.py:68-83),
    head_num the query's head count, the compressed 2048 x 2048 causal mask MindSpeed builds
    (generate_mask.py:49-56: triu(ones, diagonal=1), True = masked) with sparse mode 2
    (leftUpCausal), the module's softmax scale, keep_prob = 1 - dropout."""
    from megatron_prune.models.attention import _npu_attention, allowed_positions

    q, k, v = _qkv()
    out = _npu_attention(q, k, v, 0.3, None, 0.0)
    (query, key, value, head_num, layout), kwargs = _one_fusion_call(fake_torch_npu)
    assert layout == "BNSD" and head_num == 4
    assert query.shape == (2, 4, 12, 8) and key.shape == value.shape == (2, 2, 12, 8)
    assert query.is_contiguous() and key.is_contiguous() and value.is_contiguous()
    mask = kwargs["atten_mask"]
    assert mask.dtype == torch.bool and mask.shape == (2048, 2048)
    assert torch.equal(mask, torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1))
    assert kwargs["sparse_mode"] == 2 and kwargs["scale"] == 0.3 and kwargs["keep_prob"] == 1.0
    assert kwargs["pse"] is None and kwargs["padding_mask"] is None
    assert kwargs["inner_precise"] == 0  # MindSpeed passes 0, torch_npu's default
    reference = _sdpa_reference(q, k, v, allowed_positions(12, 12, None, q.device), 0.3)
    assert out.shape == (12, 2, 4, 8)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_npu_fused_attention_sliding_window_is_a_band(fake_torch_npu):
    """Gemma 3's sliding-window layers: sparse mode 4 (band) with pre_tockens / next_tockens the
    keys before / after the query, the names and meaning MindSpeed gives them (its uncompressed
    mask masks j < i - pre_tockens and j > i + next_tockens, generate_mask.py:24-38)."""
    from megatron_prune.models.attention import _npu_attention, allowed_positions

    q, k, v = _qkv()
    out = _npu_attention(q, k, v, 0.25, (3, 0), 0.1)
    _, kwargs = _one_fusion_call(fake_torch_npu)
    assert kwargs["sparse_mode"] == 4
    assert (kwargs["pre_tockens"], kwargs["next_tockens"]) == (3, 0)
    assert kwargs["keep_prob"] == pytest.approx(0.9)
    # the fake applies no dropout: the result is the band attention itself
    reference = _sdpa_reference(q, k, v, allowed_positions(12, 12, (3, 0), q.device), 0.25)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_npu_fused_attention_decode_step_aligns_the_mask_to_the_last_key(fake_torch_npu):
    """A KV-cache decode step (one query, many keys) uses sparse mode 3 (rightDownCausal): the
    new token sees every cached key, as the SDPA path's bottom-right aligned mask does."""
    from megatron_prune.models.attention import _npu_attention, allowed_positions

    q, k, v = _qkv()
    out = _npu_attention(q[-1:], k, v, 0.3, None, 0.0)
    _, kwargs = _one_fusion_call(fake_torch_npu)
    assert kwargs["sparse_mode"] == 3
    reference = _sdpa_reference(q[-1:], k, v, allowed_positions(1, 12, None, q.device), 0.3)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
