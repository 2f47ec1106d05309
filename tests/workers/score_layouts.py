"""Score one checkpoint at several layouts inside one torchrun launch.

usage: score_layouts.py SPEC.json   (fields: ckpt, workdir, layouts, job)
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.importance.scoring import ScoreJob, run_score_job

    spec = json.loads(Path(sys.argv[1]).read_text())
    tok = load_tokenizer(spec["ckpt"])
    for name, layout in spec["layouts"].items():
        lay = ParallelLayout(**layout)
        initialize(lay, "cpu")
        model = load_model(spec["ckpt"], sequence_parallel=lay.sequence_parallel)
        job = ScoreJob(
            checkpoint=spec["ckpt"], out=str(Path(spec["workdir"]) / name), **spec["job"]
        )
        run_score_job(job, model, tok, lay, resume=False, overwrite=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
