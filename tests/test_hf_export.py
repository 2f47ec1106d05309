"""Every pruned model exports to Hugging Face, whatever its hidden size.

Width pruning chooses the hidden size freely: ``make demo``'s pruned SmolLM2 has 512 channels and
9 heads of 64 (3 query groups), which transformers' Llama and Gemma 3 configs refuse even with an
explicit ``head_dim``. The export then uses our config and model classes (remote code, loaded
with ``trust_remote_code=True``); a family whose stock config accepts the shape (Qwen 2) keeps
its stock class.

One subprocess (the CPU shim and torch.distributed stay out of pytest's process) runs, per
case: ``convert`` of a tiny HF folder to Megatron, Megatron logits through ``eval``'s forward
(``evaluate.forward``), ``convert --to hf`` and ``convert`` of the export back to Megatron.
pytest then loads each export in transformers (fp32) and compares logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_prune.models.arch import ModelArch
from megatron_prune.models.families import get_family
from tests.helpers import REPO, _env

# The demo's kind of shape, tiny: hidden 40 is not a multiple of 6 heads (3 groups, head_dim 8).
SHAPE = dict(hidden_size=40, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
             intermediate_size=24, num_hidden_layers=2)  # fmt: skip
CASES = ("llama", "qwen2")  # llama: remote code; qwen2: its config accepts the shape
TOLERANCE = 1e-4  # fp32; logits are O(1)


def _arch(family: str, **overrides) -> ModelArch:
    from tests.tiny_models import COMMON

    cfg = {**COMMON, **SHAPE, **overrides, "model_type": get_family(family).hf_model_types[0]}
    return get_family(family).arch_from_hf(cfg)


def make_source(family: str, folder: Path, seed: int) -> torch.Tensor:
    """A tiny random model of ``family`` with SHAPE, built by the stock transformers class, as
    an HF folder; returns its logits on :func:`tokens` (a reference independent of the export).

    The stock config refuses hidden 40 at construction but not when the attribute is set
    afterwards, and the stock model computes such a shape correctly."""
    import transformers

    from megatron_prune.checkpoint import hf
    from tests.tiny_models import hf_config, perturb

    config = hf_config(family, **{**SHAPE, "hidden_size": 48})
    config.hidden_size = SHAPE["hidden_size"]
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb(model, seed)
    state = dict(model.state_dict())
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    hf.write_folder(folder, json.loads(config.to_json_string()), state)
    with torch.no_grad():
        return model(tokens()).logits.float()


def tokens() -> torch.Tensor:
    return torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- the worker


def _whole(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}


def cli(*args: str) -> None:
    """``megatron-prune ARGS`` in this process. The CLI ends by destroying the process group,
    but Megatron's parallel state keeps the dead groups (and the next ``initialize`` of the same
    layout would reuse them): drop them too."""
    from megatron.core import parallel_state

    from megatron_prune.cli import main

    assert main(list(args)) == 0, f"megatron-prune {' '.join(args)} failed"
    parallel_state.destroy_model_parallel()


def worker(work: str | Path) -> None:
    """Convert, run, export and re-import every case; write WORK/report.json."""
    work = Path(work)
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import full_logits

    report = {}
    for name in CASES:
        src, ckpt, out, back = (work / f"{name}_{s}" for s in ("src", "mcore", "hf", "back"))
        cli("convert", str(src), str(ckpt))
        initialize(ParallelLayout(), "cpu")
        model = load_model(ckpt)
        arch, original = model.arch, _whole(model.chunks[0])
        torch.save(full_logits(model.chunks, tokens(), arch.vocab_size), work / f"{name}.pt")
        cli("convert", str(ckpt), str(out), "--to", "hf")
        cli("convert", str(out), str(back))
        initialize(ParallelLayout(), "cpu")
        again = _whole(load_model(back).chunks[0])
        report[name] = {
            "arch": arch.to_dict(),
            "arch_equal": open_source(str(out)).arch == arch == load_model(back).arch,
            "tensors_equal": sorted(again) == sorted(original)
            and all(torch.equal(again[k], original[k]) for k in original),
        }
    (work / "report.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict, dict]:
    work = tmp_path_factory.mktemp("hf_export")
    refs = {name: make_source(name, work / f"{name}_src", seed=i) for i, name in enumerate(CASES)}
    # -c, not -m: dist_checkpointing's save starts a spawned helper process, which would
    # re-import a main module (and its imports) every time
    script = f"from tests.test_hf_export import worker; worker({str(work)!r})"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout}\n{proc.stderr}"
    return work, json.loads((work / "report.json").read_text()), refs


def test_export_needs_our_classes_only_where_transformers_refuses_the_shape():
    llama, family = _arch("llama"), get_family("llama")
    cfg = family.write_hf_config(llama)
    assert cfg["megatron_prune"] == {"base_class": "LlamaForCausalLM", "free_head_dim": True}
    assert cfg["auto_map"]["AutoConfig"] == "modeling_megatron_prune.MegatronPruneConfig"
    assert family.read_hf_config(cfg) == llama
    divisible = _arch("llama", hidden_size=48)
    assert "auto_map" not in family.write_hf_config(divisible)
    assert "auto_map" not in get_family("qwen2").write_hf_config(_arch("qwen2"))
    gemma = _arch("gemma3", layer_types=["sliding_attention", "full_attention"])
    cfg = get_family("gemma3").write_hf_config(gemma)
    assert cfg["megatron_prune"]["free_head_dim"] and "auto_map" in cfg
    assert get_family("gemma3").read_hf_config(cfg) == gemma


@pytest.mark.parametrize("name", CASES)
def test_export_loads_in_transformers_with_our_logits(exported, name):
    from transformers import AutoModelForCausalLM

    work, report, refs = exported
    folder = work / f"{name}_hf"
    config = json.loads((folder / "config.json").read_text())
    remote = name == "llama"
    assert ("auto_map" in config) == remote
    assert (folder / "modeling_megatron_prune.py").exists() == remote
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=remote, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert type(model).__name__ == ("MegatronPruneForCausalLM" if remote else "Qwen2ForCausalLM")
    assert model.config.hidden_size == 40 and model.config.num_attention_heads == 6
    with torch.no_grad():
        theirs = model(tokens()).logits
    ours = torch.load(work / f"{name}.pt")
    assert ours.abs().max() > 0.5  # O(1) logits: the comparison below means something
    assert (theirs - ours).abs().max() <= TOLERANCE
    assert (refs[name] - ours).abs().max() <= TOLERANCE  # the stock class's own computation


@pytest.mark.parametrize("name", CASES)
def test_export_reads_back_to_the_same_checkpoint(exported, name):
    _, report, _ = exported
    case = report[name]
    assert case["arch"]["hidden_size"] == 40 and case["arch"]["num_attention_heads"] == 6
    assert case["arch_equal"] and case["tensors_equal"]
