"""Real-model checks in one torchrun launch (2 ranks): convert a GGUF at a layout, compare
logits at several layouts with transformers' reference, measure perplexity, and round-trip
GGUF -> Megatron -> HF -> Megatron comparing every tensor bit for bit.

usage: real_model.py SPEC.json   (fields: see tests/test_real_models.py)
"""

import json
import sys
from pathlib import Path

import torch


def fused_vs_local_ppl(ckpt, layout, tokens, ids, spec, model) -> dict:
    """Perplexity of the first two windows with the fused default attention (``model``) and
    with megatron-core's unfused one on the same weights (skipped where megatron-core's local
    attention has no sliding window: before 0.15)."""
    from megatron_prune import compat
    from megatron_prune.evaluate.perplexity import perplexity
    from tests.workers.common import logits_at

    if model.arch.sliding_window is not None and not compat.since(15):
        return {}
    head = ids[: 2 * spec["seq_len"]]
    fused = perplexity(model.chunks, head, spec["seq_len"], model.arch.vocab_size,
                       spec["bos_id"], progress=False)  # fmt: skip
    local_model, _ = logits_at(ckpt, layout, tokens[:, :2], attention_backend="local")
    local = perplexity(local_model.chunks, head, spec["seq_len"], model.arch.vocab_size,
                       spec["bos_id"], progress=False)  # fmt: skip
    return {"ppl_fused_head": fused.to_dict(), "ppl_local_head": local.to_dict()}


def main() -> None:
    from megatron_prune.checkpoint import hf
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.distributed import ParallelLayout
    from megatron_prune.evaluate.perplexity import perplexity
    from megatron_prune.stages.convert import to_hf, to_megatron, whole_state
    from tests.workers.common import convert, logits_at

    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["workdir"])
    report: dict = {"logits": {}}
    first = work / "mcore"
    convert(spec["gguf"], first, spec["convert_layout"])
    tokens = torch.load(spec["tokens"])
    ref = torch.load(spec["ref_logits"])
    for layout in spec["layouts"]:
        model, logits = logits_at(first, layout, tokens)
        report["logits"][json.dumps(layout)] = float((logits - ref).abs().max())
        if layout == spec["ppl_layout"]:
            ids = torch.load(spec["ppl_ids"]).tolist()
            res = perplexity(
                model.chunks,
                ids,
                spec["seq_len"],
                model.arch.vocab_size,
                spec["bos_id"],
                progress=False,
            )
            report["ppl"] = res.to_dict()
            report.update(fused_vs_local_ppl(first, layout, tokens, ids, spec, model))
        del model

    # round trip: -> HF -> Megatron at TP=1, compare every tensor
    to_hf(open_source(str(first)), work / "hf", overwrite=True)
    to_megatron(
        open_source(str(work / "hf")),
        work / "mcore2",
        ParallelLayout(),
        overwrite=True,
        device="cpu",
    )
    a, b = whole_state(first), whole_state(work / "mcore2")
    report["roundtrip_keys_equal"] = sorted(a) == sorted(b)
    report["roundtrip_unequal"] = [k for k in a if k in b and not torch.equal(a[k], b[k])]
    if torch.distributed.get_rank() == 0:
        from megatron_prune.checkpoint.gguf_io import read_gguf

        exported = hf.read_tensors(work / "hf")
        source_tensors = read_gguf(open_source(spec["gguf"]).path).tensors
        report["hf_unequal"] = [
            k for k, v in source_tensors.items() if not torch.equal(v, exported[k])
        ]
        report["hf_extra"] = sorted(set(exported) - set(source_tensors))
        Path(spec["out"]).write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
