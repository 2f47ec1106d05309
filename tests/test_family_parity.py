"""Every family computes what its reference computes, at every layout.

Tiny random models (transformers for llama/qwen2/qwen3/gemma3, the plain-PyTorch sandwich
reference for pangu) are converted at TP=2 and evaluated at TP=2, TP=2+SP, PP=2, PP=2 x VPP=2
and TP=1 (x DP=2) inside one torchrun launch; TP=2 x PP=2 (four ranks) is a slow test.
"""

import json

import pytest
import torch

from megatron_prune import compat
from megatron_prune.models.families import get_family
from tests.helpers import torchrun
from tests.reference_sandwich import SandwichLM
from tests.tiny_models import make_hf_model, perturb, save_hf_model, save_reference_model

LAYOUTS = [
    {"tp": 2},
    {"tp": 2, "sequence_parallel": True},
    {"pp": 2},
    {"pp": 2, "vpp": 2},
    {"tp": 1},
]
TOLERANCE = 1e-4  # fp32; logits are O(1)
ATTENTION_TOLERANCE = 1e-5  # fused (SDPA) vs megatron-core's local attention, same weights


def _pangu_case(tmp):
    from tests.tiny_models import COMMON

    cfg = {**COMMON, "model_type": "pangu_sandwich", "tie_word_embeddings": False}
    arch = get_family("pangu").arch_from_hf(cfg)
    model = SandwichLM(arch)
    perturb(model, seed=5)
    return model.eval(), save_reference_model(model, arch, tmp / "pangu_hf")


def run_parity(tmp, layouts, nproc, compare_local_attention=False):
    """Make every family's reference, then convert at TP=2 and compare at ``layouts``."""
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp / "tokens.pt")
    cases = []
    for family in ("llama", "qwen2", "qwen3", "gemma3", "pangu"):
        if family == "pangu":
            model, folder = _pangu_case(tmp)
            with torch.no_grad():
                ref = model(tokens)
        else:
            model = make_hf_model(family, seed=len(cases))
            folder = save_hf_model(model, tmp / f"{family}_hf")
            with torch.no_grad():
                ref = model(tokens).logits
        torch.save(ref.float(), tmp / f"{family}_ref.pt")
        cases.append({
            "name": family, "src": str(folder), "ckpt": str(tmp / f"{family}_mcore"),
            "tokens": str(tmp / "tokens.pt"), "ref": str(tmp / f"{family}_ref.pt"),
        })  # fmt: skip
    spec = {"cases": cases, "convert_layout": {"tp": 2}, "layouts": layouts,
            "out": str(tmp / "report.json"),
            "compare_local_attention": compare_local_attention}  # fmt: skip
    (tmp / "spec.json").write_text(json.dumps(spec))
    torchrun("parity.py", nproc, str(tmp / "spec.json"))
    return json.loads((tmp / "report.json").read_text())


@pytest.fixture(scope="module")
def parity_report(tmp_path_factory):
    return run_parity(
        tmp_path_factory.mktemp("parity"), LAYOUTS, nproc=2, compare_local_attention=True
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "pangu"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_logits_match_reference(parity_report, family, layout):
    diff = parity_report[family][json.dumps(layout, sort_keys=True)]
    assert diff <= TOLERANCE, f"{family} at {layout}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "pangu"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_fused_attention_equals_local(parity_report, family, layout):
    """The default core attention (SDPA: causal, GQA, Gemma 3's sliding window and softmax
    scale, QK-norm upstream) gives the logits of megatron-core's DotProductAttention."""
    if family == "gemma3" and not compat.local_attention_has_window():
        pytest.skip("megatron-core before 0.15 has no sliding window in its local attention")
    diff = parity_report[family + ":fused_vs_local"][json.dumps(layout, sort_keys=True)]
    assert diff <= ATTENTION_TOLERANCE, f"{family} at {layout}: fused vs local {diff:.2e}"


@pytest.mark.slow
def test_tensor_and_pipeline_parallel_together(tmp_path):
    layout = {"pp": 2, "tp": 2}
    report = run_parity(tmp_path, [layout], nproc=4)
    for family, diffs in report.items():
        diff = diffs[json.dumps(layout, sort_keys=True)]
        assert diff <= TOLERANCE, f"{family} at TP=2 x PP=2: max |logit diff| {diff:.2e}"
