"""Pure, single-process units: index maps, windows, layouts, atomic outputs, the CPU shim."""

import pytest
import torch

from megatron_prune.checkpoint.atomic import OutputExistsError, atomic_directory
from megatron_prune.distributed import ParallelLayout
from megatron_prune.errors import UserError
from megatron_prune.evaluate.perplexity import windows
from megatron_prune.models.arch import ArchError, ModelArch
from megatron_prune.models.families import FAMILIES, family_for_hf_config
from megatron_prune.models.weight_map import (
    FuseQKV,
    WeightMapError,
    hf_to_megatron,
    megatron_to_hf,
)

ARCH = ModelArch(family="llama", num_layers=2, hidden_size=8, ffn_hidden_size=12,
                 num_attention_heads=4, num_query_groups=2, head_dim=1, vocab_size=10)  # fmt: skip


def test_fuse_qkv_worked_example():
    rule = FuseQKV("qkv", "q", "k", "v")
    hf = {"q": torch.tensor([[0.0], [1], [2], [3]]), "k": torch.tensor([[10.0], [11]]),
          "v": torch.tensor([[20.0], [21]])}  # fmt: skip
    fused = rule.to_megatron(hf.__getitem__, ARCH)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    back = rule.to_hf(fused, ARCH)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("flags", [{}, {"qkv_bias": True, "qk_norm": True, "post_norms": True}])
def test_weight_table_round_trip_is_exact(family, flags):
    arch = ModelArch(**{**ARCH.to_dict(), "family": family, **flags})
    rules = FAMILIES[family].rules(arch)
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (4, 8), "k": (2, 8), "v": (2, 8)}
    hf = {}
    for r in rules:
        for name in r.hf_names():
            kind = name.split(".")[-2][0]
            if name.endswith("bias"):
                hf[name] = torch.randn(shapes.get(kind, (4, 8))[0], generator=g)
            elif "proj" in name and kind in shapes:
                hf[name] = torch.randn(shapes[kind], generator=g)
            elif "norm" in name:
                hf[name] = torch.randn(
                    1 if "q_norm" in name or "k_norm" in name else 8, generator=g
                )
            elif "embed" in name or "lm_head" in name:
                hf[name] = torch.randn(10, 8, generator=g)
            elif "o_proj" in name or "down" in name:
                hf[name] = torch.randn(8, 4 if "o_proj" in name else 12, generator=g)
            else:
                hf[name] = torch.randn(12, 8, generator=g)
    mcore = hf_to_megatron(hf, rules, arch)
    assert mcore["embedding.word_embeddings.weight"].shape[0] == arch.padded_vocab_size == 128
    back = megatron_to_hf(mcore, rules, arch)
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_unknown_source_tensor_is_refused():
    rules = FAMILIES["llama"].rules(ARCH)
    with pytest.raises(WeightMapError, match="missing"):
        hf_to_megatron({"model.embed_tokens.weight": torch.zeros(10, 8)}, rules, ARCH)


def test_unknown_model_type_is_refused():
    with pytest.raises(ArchError, match="not supported"):
        family_for_hf_config({"model_type": "mamba"})


def test_layout_errors_name_valid_values():
    smol = ModelArch(
        family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
        num_attention_heads=9, num_query_groups=3, head_dim=64, vocab_size=49152,
    )  # fmt: skip
    with pytest.raises(
        ArchError, match=r"TP=2 does not divide num_attention_heads=9 \(valid TP: \[1, 3, 9\]\)"
    ):
        smol.check_layout(2, 1)
    with pytest.raises(ArchError, match="PP=31 needs at least 31 layers"):
        smol.check_layout(1, 31)
    with pytest.raises(ArchError, match="does not divide num_layers=30"):
        smol.check_layout(1, 4)
    smol.check_layout(3, 2)
    with pytest.raises(UserError, match="--sequence-parallel needs"):
        ParallelLayout(sequence_parallel=True)
    with pytest.raises(UserError, match="not divisible by tp"):
        ParallelLayout(tp=2, pp=2).data_parallel_size(6)


def test_windows_protocol():
    assert list(windows([5, 6, 7, 8, 9], 3, None)) == [[5, 6, 7], [8, 9]]
    assert list(windows([5, 6, 7, 8, 9], 3, 1)) == [[1, 5, 6], [1, 7, 8], [1, 9]]
    assert list(windows([5, 6, 7, 8], 2, None)) == [[5, 6], [7, 8]]
    assert list(windows([5, 6, 7], 2, None)) == [[5, 6]]  # a 1-token tail predicts nothing


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as scratch:
            (scratch / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_overwrite_rules(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_directory(dst):
            pass
    assert (dst / "old").read_text() == "keep"
    with atomic_directory(dst, overwrite=True) as scratch:
        (scratch / "new").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in dst.iterdir()] == ["new"]


def _cuda_literal_mask() -> torch.Tensor:
    """A megatron function with ``device="cuda"`` inside: on a machine without CUDA it fails
    unless the shim redirects it."""
    import megatron.core.transformer.utils as mutils

    return mutils.get_sliding_window_causal_mask(4, 4, (1, 0))


def test_cpu_shim_patches_megatron_and_restores():
    """What the shim changes, before, while and after it is applied; idempotent; scoped to the
    listed megatron modules (plain torch elsewhere is not redirected)."""
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.utils as mutils

    from megatron_prune import accelerator

    was_applied = accelerator.shim_applied()
    accelerator.remove_cpu_shim()
    try:
        originals = (torch.cuda.current_device, torch.Tensor.cuda, tp_random._set_cuda_rng_state)
        assert mutils.torch is torch and not accelerator.shim_applied()
        if not torch.cuda.is_available():
            with pytest.raises((AssertionError, RuntimeError)):  # no CUDA: the literal fails
                _cuda_literal_mask()

        accel = accelerator.prepare("cpu")
        assert (accel.kind, accel.backend) == ("cpu", "gloo") and accelerator.shim_applied()
        patched = (torch.cuda.current_device, torch.Tensor.cuda, tp_random._set_cuda_rng_state)
        accelerator.apply_cpu_shim()  # a second call changes nothing
        assert (torch.cuda.current_device, torch.Tensor.cuda) == patched[:2]
        assert all(p is not o for p, o in zip(patched, originals, strict=True))
        assert torch.cuda.current_device() == "cpu"
        assert mutils.torch is not torch  # the module's torch redirects device="cuda"
        mask = _cuda_literal_mask()
        assert mask.device.type == "cpu"
        assert mask.tolist()[3] == [True, True, False, False]  # True = masked
        import megatron.core.tensor_parallel.layers as unlisted

        assert unlisted.torch is torch  # modules not listed keep plain torch
        if not torch.cuda.is_available():
            with pytest.raises((AssertionError, RuntimeError)):  # and so does this module
                torch.zeros(1, device="cuda")

        accelerator.remove_cpu_shim()
        restored = (torch.cuda.current_device, torch.Tensor.cuda, tp_random._set_cuda_rng_state)
        assert all(r is o for r, o in zip(restored, originals, strict=True))
        assert mutils.torch is torch and not accelerator.shim_applied()
    finally:
        if was_applied:
            accelerator.apply_cpu_shim()


def test_cpu_shim_on_a_cuda_machine_hides_cuda(monkeypatch):
    """``--device cpu`` / ``MEGATRON_PRUNE_DEVICE=cpu`` on a GPU node: the shim applies (it used
    to refuse) and megatron-core then sees no CUDA, so it takes its CPU branches."""
    from megatron_prune import accelerator

    was_applied = accelerator.shim_applied()
    accelerator.remove_cpu_shim()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # simulate a CUDA machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("MEGATRON_PRUNE_DEVICE", "cpu")
    try:
        accel = accelerator.prepare()
        assert accel.kind == "cpu" and accelerator.shim_applied()
        assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
        assert torch.cuda.current_device() == "cpu"
        assert _cuda_literal_mask().device.type == "cpu"
        accelerator.remove_cpu_shim()
        assert torch.cuda.is_available() and torch.cuda.device_count() == 8
    finally:
        accelerator.remove_cpu_shim()
        monkeypatch.undo()
        if was_applied:
            accelerator.apply_cpu_shim()


def test_accelerator_rejects_unknown_device():
    from megatron_prune.accelerator import detect

    with pytest.raises(UserError, match="unknown device"):
        detect("tpu")


def test_gram_eigenvalues_are_squared_singular_values():
    from megatron_prune.importance.esd import gram_eigenvalues

    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s2 = torch.linalg.svdvals(w).pow(2).sort().values
    rows = gram_eigenvalues(w, split_rows=True, tp_group=None)  # W^T W: 20 values, 8 zeros
    cols = gram_eigenvalues(w, split_rows=False, tp_group=None)  # W W^T: 12 values
    assert torch.allclose(rows[-12:], s2) and torch.allclose(cols, s2)
    # sharded: rows split in two, Grams summed, gives the whole matrix's spectrum
    halves = sum(h.t() @ h for h in w.chunk(2))
    assert torch.allclose(torch.linalg.eigvalsh(halves)[-12:], s2)


def test_hill_estimator_recovers_a_power_law():
    from megatron_prune.importance.esd import esd_alpha, hill_alpha

    g = torch.Generator().manual_seed(0)
    alpha = 3.0  # density ~ x^-alpha for x >= 1: inverse-CDF sampling
    eigs = (1 - torch.rand(20000, generator=g, dtype=torch.float64)) ** (-1 / (alpha - 1))
    eigs = eigs.sort().values
    assert abs(hill_alpha(eigs, 0)[0] - alpha) < 0.05
    assert abs(esd_alpha(eigs, "xmin_mid") - alpha) < 0.1
    assert abs(esd_alpha(eigs, "xmin_peak") - alpha) < 0.2
    with pytest.raises(UserError, match="unknown ESD method"):
        esd_alpha(eigs, "xmin_max")


def test_megatron_lm_bf16_puts_the_teacher_in_bf16():
    """The trio honours Megatron-LM's own --bf16: the teacher is held in bf16 like the student
    (Float16Module casts the student only), with or without --kd-teacher-bf16."""
    import argparse

    from megatron_prune.megatron_lm import add_distillation_args, settings_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--bf16", action="store_true")  # Megatron-LM's flag
    add_distillation_args(parser)
    base = ["--kd-teacher", "teacher"]
    assert settings_from_args(parser.parse_args([*base, "--bf16"])).teacher_bf16
    assert not settings_from_args(parser.parse_args(base)).teacher_bf16
    assert settings_from_args(parser.parse_args([*base, "--kd-teacher-bf16"])).teacher_bf16
