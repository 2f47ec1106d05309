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
    from megatron_prune.inputs import read_text

    path = folder / "config.json"
    try:
        return json.loads(read_text(path, "config"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}): "
                              "fix or re-download it") from None  # fmt: skip


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


def lazy_tensors(folder: Path, dtype: torch.dtype = torch.float32):
    """Every tensor of the folder's safetensors files, read only when asked for (headers are
    read now, so a damaged file fails before any work)."""
    from megatron_prune.checkpoint.lazy import LazyTensors

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has a config.json but no *.safetensors files")
    where, shapes = {}, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    where[name] = file
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from err

    def load(name: str) -> torch.Tensor:
        try:
            with safe_open(str(where[name]), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{where[name]}: cannot read tensor {name} ({err})") from err

    def load_rows(name: str, start: int, stop: int) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_slice(name)[start:stop]

    return LazyTensors(shapes, load, dtype, load_rows, origin=str(folder))


def remote_code(base_class: str) -> str:
    """Our model class for a config with ``auto_map`` (see
    :mod:`megatron_prune.models.hf_remote_code`), subclassing transformers' ``base_class``."""
    from megatron_prune.models import hf_remote_code

    template = Path(hf_remote_code.__file__).read_text()
    line = f'BASE_CLASS = "{hf_remote_code.BASE_CLASS}"'
    assert template.count(line) == 1, "hf_remote_code.py must assign BASE_CLASS once"
    return template.replace(line, f'BASE_CLASS = "{base_class}"')


def write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors file and the config (the caller makes the folder atomic), and the
    model class a config with ``auto_map`` names."""
    from megatron_prune.models.families import EXPORT_KEY, REMOTE_MODULE

    folder.mkdir(parents=True, exist_ok=True)
    if "auto_map" in config:
        base = config[EXPORT_KEY]["base_class"]
        (folder / f"{REMOTE_MODULE}.py").write_text(remote_code(base))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
