"""Convert each case's source at one layout, then compute its logits at several layouts and
compare with reference logits. Run under torchrun; rank 0 writes a JSON report.

usage: parity.py SPEC.json   (see tests/test_family_parity.py for the spec's fields)
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.commands.convert import to_megatron
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import full_logits

    spec = json.loads(Path(sys.argv[1]).read_text())
    report = {}
    for case in spec["cases"]:
        ckpt = Path(case["ckpt"])
        if "src" in case:
            to_megatron(
                open_source(case["src"]),
                ckpt,
                ParallelLayout(**spec["convert_layout"]),
                overwrite=True,
                device="cpu",
            )
        tokens = torch.load(case["tokens"])
        ref = torch.load(case["ref"])
        diffs = {}
        for layout in spec["layouts"]:
            lay = ParallelLayout(**layout)
            initialize(lay, "cpu")
            model = load_model(ckpt, sequence_parallel=lay.sequence_parallel)
            logits = full_logits(model.chunks, tokens, model.arch.vocab_size)
            diffs[json.dumps(layout, sort_keys=True)] = float((logits - ref).abs().max())
        report[case["name"]] = diffs
    if torch.distributed.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
