"""Accelerator check (run on a GPU/NPU machine; CPU works too): every family's logits on the
device against transformers on the CPU, and a tiny model's importance scores, written to --out
so that two devices' scores can be compared (``--compare A B``).

usage: python tools/device_check.py --device cuda --text FILE --out DIR
       python tools/device_check.py --compare DIR_A DIR_B
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny_models


def check(device: str, text_file: Path, out: Path) -> None:
    import torch

    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import full_logits
    from megatron_prune.importance.scoring import ALL_METRICS, ScoreJob, run_score_job
    from megatron_prune.stages.convert import to_megatron
    from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    layout = ParallelLayout()
    accel = initialize(layout, device)
    dev = accel.device(0)
    report = {"device": str(dev), "torch": torch.__version__, "backend": accel.backend}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    text = text_file.read_text()[:200_000]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in ("llama", "qwen2", "qwen3", "gemma3"):
            hf_model = make_hf_model(family, seed=1)
            with torch.no_grad():
                ref = hf_model(tokens).logits.float()
            folder = save_hf_model(hf_model, tmp / family)
            save_word_tokenizer(folder, text)
            to_megatron(open_source(str(folder)), tmp / f"{family}_mc", layout, True, device)
            model = load_model(tmp / f"{family}_mc", device=None if dev.type == "cpu" else dev)
            logits = full_logits(model.chunks, tokens, model.arch.vocab_size)
            report[f"max_abs_logit_diff/{family}"] = float((logits - ref).abs().max())
        (tmp / "calib.txt").write_text(text)
        ckpt = tmp / "gemma3_mc"
        model = load_model(ckpt, device=None if dev.type == "cpu" else dev)
        job = ScoreJob(checkpoint=str(ckpt), data=str(tmp / "calib.txt"), samples=6, seq_len=24,
                       out=str(out / "scores"), metrics=list(ALL_METRICS), seed=7,
                       micro_batches=1, ppl_samples=2)  # fmt: skip
        run_score_job(job, model, load_tokenizer(ckpt), layout, resume=False, overwrite=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def compare(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    sa, sb = (
        load_file(str(a / "scores" / "scores.safetensors")),
        load_file(str(b / "scores" / "scores.safetensors")),
    )
    worst = {
        k: float(((sa[k] - sb[k]).abs() / sb[k].abs().clamp_min(1e-12)).nan_to_num().max())
        for k in sa
    }
    print(json.dumps({"max_relative_diff": worst}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        check(args.device, args.text, args.out)


if __name__ == "__main__":
    main()
