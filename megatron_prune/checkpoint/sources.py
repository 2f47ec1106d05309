"""What ``convert`` (and every command taking a model) can read: ``gguf:PATH``, a Hugging Face
folder, or a Megatron checkpoint of this tool. Opening a source reads only headers, so layout
errors surface before any tensor is loaded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_prune.checkpoint import gguf_io, hf, megatron_lm_format, megatron_lm_legacy
from megatron_prune.checkpoint.lazy import MappedTensors
from megatron_prune.checkpoint.metadata import METADATA_FILE, CheckpointError, CheckpointMeta
from megatron_prune.models.arch import ModelArch
from megatron_prune.models.families import Family, family_for_hf_config, get_family
from megatron_prune.models.weight_map import hf_to_megatron

TOKENIZER_DIR = "tokenizer"


@dataclass
class Source:
    kind: str  # "gguf" | "hf" | "megatron" | "megatron-lm-legacy" (mp_rank_* torch files)
    path: Path
    arch: ModelArch
    family: Family
    meta: CheckpointMeta | None = None  # Megatron sources: their description

    def megatron_state(self) -> Mapping[str, torch.Tensor]:
        """Megatron-named fp32 tensors (GGUF, HF and legacy Megatron-LM sources), each read from
        the source file when asked for. The weight map is checked on shapes first: a source
        that does not match its family fails here, before any tensor is read."""
        if self.kind == "megatron-lm-legacy":
            directory = megatron_lm_format.tensor_directory(self.path)
            return megatron_lm_legacy.LegacyTensors(directory, self.arch)
        if self.kind == "gguf":
            tensors = gguf_io.lazy_gguf_tensors(self.path)
        elif self.kind == "hf":
            tensors = hf.lazy_tensors(self.path)
        else:
            raise CheckpointError("a Megatron source is loaded shard by shard, not as a whole")
        if self.arch.tie_embeddings:
            tensors = tensors.without({"lm_head.weight"})  # some tied checkpoints save both
        rules = self.family.rules(self.arch)
        hf_to_megatron(tensors.meta(), rules, self.arch)  # every tensor used, shapes fit
        return MappedTensors(tensors, rules, self.arch)

    def save_tokenizer(self, out_dir: Path) -> dict:
        """Write Hugging Face tokenizer files to ``out_dir``; return what metadata records."""
        if self.kind in ("megatron", "megatron-lm-legacy"):
            meta = self.meta or CheckpointMeta.read(self.path)
            src = self.path / meta.tokenizer.get("path", TOKENIZER_DIR)  # absolute: elsewhere
            if not meta.tokenizer or not (src / "tokenizer.json").is_file():
                return {}
            out_dir.mkdir()
            for name in hf.TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, out_dir / name)
            return {**meta.tokenizer, "path": TOKENIZER_DIR}
        if self.kind == "gguf":
            gguf_io.save_gguf_tokenizer(self.path, out_dir)
        elif (self.path / "tokenizer.json").is_file():
            out_dir.mkdir()  # a fast tokenizer is copied as is
            for name in hf.TOKENIZER_FILES:
                if (self.path / name).is_file():
                    shutil.copy2(self.path / name, out_dir / name)
        elif (self.path / "tokenizer.model").is_file():  # sentencepiece only: build tokenizer.json
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(self.path)).save_pretrained(str(out_dir))
        else:
            return {}
        return tokenizer_record(out_dir)


def _special_token(config: dict, name: str) -> str | None:
    token = config.get(name)
    return token.get("content") if isinstance(token, dict) else token


def tokenizer_record(tokenizer_dir: Path) -> dict:
    """What metadata keeps of a tokenizer: its folder and the BOS / EOS ids."""
    from tokenizers import Tokenizer

    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = {}
    for key in ("bos", "eos"):
        token = _special_token(config, f"{key}_token")
        ids[f"{key}_id"] = tok.token_to_id(token) if token else None
    return {"path": TOKENIZER_DIR, **ids}


def _arch(family, cfg: dict, where: str):
    """The family's architecture of ``cfg``; a missing key is named with its file."""
    try:
        return family.read_hf_config(cfg)
    except KeyError as err:
        raise CheckpointError(
            f"{where} has no {err.args[0]!r}, which a {family.name} model "
            "needs: add it (see the model's original config)"
        ) from None


def open_source(spec: str, tokenizer: str | Path | None = None) -> Source:
    """Identify ``spec`` and read its architecture. ``tokenizer`` (a Hugging Face tokenizer
    folder) names the tokenizer of a Megatron-LM checkpoint whose args do not."""
    if spec.startswith("gguf:"):
        path = Path(spec[len("gguf:") :])
        cfg = gguf_io.read_gguf_config(path)
        family = family_for_hf_config(cfg)
        return Source("gguf", path, _arch(family, cfg, f"the metadata of GGUF {path}"), family)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"source {spec} does not exist")
    if (path / METADATA_FILE).is_file():
        meta = CheckpointMeta.read(path)
        return Source("megatron", path, meta.arch, get_family(meta.arch.family), meta)
    if megatron_lm_format.is_megatron_lm_layout(path):  # Megatron-LM's own --save output
        meta = megatron_lm_format.read_meta(path, tokenizer)
        kind = "megatron"
        if megatron_lm_legacy.is_legacy(megatron_lm_format.tensor_directory(path)):
            kind = "megatron-lm-legacy"  # per-rank torch files: read whole, like HF
        return Source(kind, path, meta.arch, get_family(meta.arch.family), meta)
    if hf.is_hf_folder(path):
        cfg = hf.read_config(path)
        family = family_for_hf_config(cfg)
        return Source("hf", path, _arch(family, cfg, str(path / "config.json")), family)
    if path.suffix == ".gguf":
        return open_source(f"gguf:{path}")
    raise CheckpointError(
        f"cannot tell what {spec} is: expected gguf:FILE, a Hugging Face folder with config.json, "
        f"or a megatron-prune checkpoint with {METADATA_FILE}"
    )


def write_description(directory: Path, meta: CheckpointMeta, tokenizer_source: Source) -> None:
    """The one writer of what makes a dist checkpoint one of ours: ``tokenizer/`` (copied or
    built from ``tokenizer_source``) and ``megatron_prune.json`` recording it."""
    from dataclasses import replace

    tokenizer = tokenizer_source.save_tokenizer(directory / TOKENIZER_DIR)
    replace(meta, tokenizer=tokenizer or meta.tokenizer).write(directory)
