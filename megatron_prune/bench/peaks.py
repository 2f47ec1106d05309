"""Dense (no sparsity) peak TFLOP/s of accelerators, for model-FLOPs utilisation.

Vendor datasheet figures for 16-bit tensor-core math (bf16 = fp16 on these parts), matched on
the device name torch reports. No fp32 figures: MFU is reported only for bf16/fp16 runs (or
with ``--peak-tflops``), and never on the CPU.
"""

from __future__ import annotations

import torch

# (substrings that must all appear in the lower-cased device name, TFLOP/s); first match wins
PEAKS_16BIT: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200",), 989.0),
    (("h100", "pcie"), 756.0),
    (("h100",), 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (("a100",), 312.0),
    # Commonly cited for the 910B; the 910B1..B4 variants differ: pass --peak-tflops to be sure.
    (("910b",), 320.0),
)


def device_name(device: torch.device) -> str:
    """What the device calls itself ("NVIDIA H200", "Ascend910B2", "cpu")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "npu":
        return torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    return "cpu"


def peak_tflops(name: str, dtype: torch.dtype) -> float | None:
    """The dense peak of device ``name`` in ``dtype``, or None when unknown (CPU, fp32, a
    device not in the table)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    lowered = name.lower()
    for needles, peak in PEAKS_16BIT:
        if all(n in lowered for n in needles):
            return peak
    return None
