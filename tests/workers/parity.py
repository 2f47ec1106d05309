"""Convert each case's source at one layout, then compute its logits at several layouts and
compare with reference logits (and, with ``compare_local_attention``, the default fused core
attention with megatron-core's local one). Run under torchrun; rank 0 writes a JSON report.

usage: parity.py SPEC.json   (see tests/test_family_parity.py for the spec's fields)
"""

import json
import sys
from pathlib import Path

import torch


def local_attention_runs(ckpt: Path) -> bool:
    """megatron-core's local attention has sliding windows from 0.15 on only (compat)."""
    from megatron_prune import compat
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    return compat.local_attention_has_window() or not CheckpointMeta.read(ckpt).arch.sliding_window


def main() -> None:
    from tests.workers.common import convert, logits_at

    spec = json.loads(Path(sys.argv[1]).read_text())
    report = {}
    for case in spec["cases"]:
        ckpt = Path(case["ckpt"])
        if "src" in case:
            convert(case["src"], ckpt, spec["convert_layout"])
        tokens = torch.load(case["tokens"])
        ref = torch.load(case["ref"])
        diffs, fused_vs_local = {}, {}
        for layout in spec["layouts"]:
            key = json.dumps(layout, sort_keys=True)
            _, logits = logits_at(ckpt, layout, tokens)
            diffs[key] = float((logits - ref).abs().max())
            if spec.get("compare_local_attention") and local_attention_runs(ckpt):
                _, local = logits_at(ckpt, layout, tokens, attention_backend="local")
                fused_vs_local[key] = float((logits - local).abs().max())
        report[case["name"]] = diffs
        report[case["name"] + ":fused_vs_local"] = fused_vs_local
    if torch.distributed.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
