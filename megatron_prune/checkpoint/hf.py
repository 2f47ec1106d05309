"""Hugging Face folders: ``config.json`` + ``*.safetensors`` (+ tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_prune.checkpoint.metadata import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def read_tensors(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, as ``dtype``."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has a config.json but no *.safetensors files")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name).to(dtype)
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from err
    return out


def write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors file and the config (the caller makes the folder atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
