"""Source tensors read when asked for, one at a time.

``convert`` fills each rank's shards from whole source tensors; reading the whole source on
every rank would hold world-size copies of the model. A :class:`LazyTensors` knows every name
and shape from the file headers and reads (and, for GGUF, dequantizes) a tensor only on access,
so a rank touches only the tensors of its own pipeline stage, one at a time. ``meta()`` gives
the same mapping as shape-only tensors, so a weight map can be checked before any data is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from megatron_prune.errors import CheckpointError


class LazyTensors(Mapping[str, torch.Tensor]):
    """Name -> tensor, read by ``load(name)`` on access; shapes known up front."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        load: Callable[[str], torch.Tensor],
        dtype: torch.dtype = torch.float32,
        load_rows: Callable[[str, int, int], torch.Tensor] | None = None,
        origin: str = "the source",
    ) -> None:
        self.shapes = shapes
        self._load = load
        self._load_rows = load_rows
        self.dtype = dtype
        self.origin = origin

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self._finite(name, self._load(name).to(self.dtype))

    def _finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Refuse NaN or Inf weights (a damaged file: GGUF has no checksum) as they are read."""
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"tensor {name} of {self.origin} holds {bad} NaN or Inf "
                                  "values: the file is damaged; download or export it "
                                  "again")  # fmt: skip
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name``, reading only those when the format allows."""
        if self._load_rows is None:
            return self[name][start:stop].clone()
        return self._finite(name, self._load_rows(name, start, stop).to(self.dtype))

    def without(self, names: set[str]) -> LazyTensors:
        """The same source less ``names`` (a tied checkpoint's redundant output layer)."""
        return LazyTensors({k: v for k, v in self.shapes.items() if k not in names},
                           self._load, self.dtype, self._load_rows, self.origin)  # fmt: skip

    def meta(self) -> dict[str, torch.Tensor]:
        """Shape-only stand-ins of every tensor (no data is read)."""
        return {k: torch.empty(s, dtype=self.dtype, device="meta") for k, s in self.shapes.items()}


class MappedTensors(Mapping[str, torch.Tensor]):
    """Megatron-named tensors computed on access from a source mapping by weight-map rules."""

    def __init__(self, source: Mapping[str, torch.Tensor], rules: list, arch) -> None:
        self.source = source
        self.rules = {r.megatron: r for r in rules}
        self.arch = arch

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.rules[name].to_megatron(self.source.__getitem__, self.arch)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of Megatron tensor ``name``. A vocabulary table (embedding,
        output layer) is read only for those rows, with the padding rows as zeros; any other
        tensor is computed whole and cut."""
        rule = self.rules[name]
        hf_name = getattr(rule, "hf", None)
        if not getattr(rule, "vocab", False) or not hasattr(self.source, "rows"):
            return self[name][start:stop].clone()
        real = self.source.shapes[hf_name][0]
        block = self.source.rows(hf_name, min(start, real), min(stop, real))
        if block.shape[0] < stop - start:  # padding rows past the real vocabulary
            pad = block.new_zeros(stop - start - block.shape[0], *block.shape[1:])
            block = torch.cat([block, pad])
        return block

    def __iter__(self) -> Iterator[str]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)
