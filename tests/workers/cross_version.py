"""One side of the cross-version checkpoint test (tests/test_compat.py): read a checkpoint the
other megatron-core version wrote and compare its logits with the writer's, then write one for
the other side. Run under torchrun; rank 0 writes the report.

usage: cross_version.py SPEC.json
  SPEC: {"tokens": PT, "report": JSON, "read": {"ckpt", "layout", "logits"} | null,
         "write": {"src", "ckpt", "layout", "logits"} | null}
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron_prune import compat
    from tests.workers.common import convert, logits_at

    spec = json.loads(Path(sys.argv[1]).read_text())
    tokens = torch.load(spec["tokens"])
    report = {"megatron_core": compat.megatron_core_version()}
    if spec.get("read"):
        read = spec["read"]
        _, logits = logits_at(Path(read["ckpt"]), read["layout"], tokens)
        report["max_diff"] = float((logits - torch.load(read["logits"])).abs().max())
    if spec.get("write"):
        write = spec["write"]
        convert(write["src"], Path(write["ckpt"]), write["layout"])
        _, logits = logits_at(Path(write["ckpt"]), write["layout"], tokens)
        if torch.distributed.get_rank() == 0:
            torch.save(logits, write["logits"])
    if torch.distributed.get_rank() == 0:
        Path(spec["report"]).write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
