"""Where the Tyr search's work lives when it runs at TP x PP x DP.

Every rank runs the same search in lockstep: the evolutionary logic is deterministic and every
fitness value is broadcast from rank 0, so all ranks take the same decisions. The work splits
as the model does:

* statistics: each TP rank holds a block of rows of a layer's input Gram (its own input columns
  against all of them, after an all-gather of the input over TP); DP replicas add their own
  calibration windows; the full Gram is reduced onto the layer's *owner*, the first TP rank of
  the first DP replica on the layer's pipeline stage;
* the supernet: the owner computes the layer's removal orders and writes its files (the folder
  must be one every rank reads, as a checkpoint folder is); every rank builds the variants of
  its own layers from them and keeps its TP shard of the input columns;
* fitness: each DP replica computes the KL of its share of the calibration windows; the
  per-window values are summed over DP into their places, so the mean is taken in window order
  whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SearchRanks:
    """This rank's place in the layout, and which rank owns each layer's supernet entry."""

    rank: int
    world: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    owners: tuple[int, ...]  # layer -> global rank that writes its supernet files
    device: torch.device

    @classmethod
    def of(cls, local_layers: list[int], num_layers: int, device: torch.device) -> SearchRanks:
        """Collective: every rank names the layers it owns (those of its stage, if it is the
        stage's first TP rank of the first DP replica)."""
        from megatron.core import parallel_state as ps

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
        claim = torch.zeros(num_layers, dtype=torch.long, device=device)
        if tp_rank == 0 and dp_rank == 0:
            claim[local_layers] = rank + 1
        if world > 1:
            torch.distributed.all_reduce(claim)
        owners = tuple(int(v) - 1 for v in claim.cpu())
        if min(owners) < 0:
            raise AssertionError(f"layers without an owner: {owners}")
        return cls(rank, world, ps.get_tensor_model_parallel_world_size(), tp_rank,
                   ps.get_data_parallel_world_size(), dp_rank, owners, device)  # fmt: skip

    @property
    def writes_stage(self) -> bool:
        """This rank writes the supernet files of its stage's layers."""
        return self.tp_rank == 0 and self.dp_rank == 0

    def my_windows(self, count: int) -> list[int]:
        """The indices among the first ``count`` windows that this DP replica computes."""
        return list(range(self.dp_rank, count, self.dp))

    def columns(self, width: int) -> slice:
        """This TP rank's input columns of a row-parallel weight ``width`` columns wide."""
        per = width // self.tp
        return slice(self.tp_rank * per, (self.tp_rank + 1) * per)

    def gather_columns(self, shard: torch.Tensor) -> torch.Tensor:
        """[h, c/t] shards of a row-parallel weight -> the whole [h, c] (TP collective)."""
        if self.tp == 1:
            return shard.detach().clone()
        from megatron.core import parallel_state as ps

        parts = [torch.empty_like(shard) for _ in range(self.tp)]
        torch.distributed.all_gather(parts, shard.detach().contiguous(),
                                     group=ps.get_tensor_model_parallel_group())  # fmt: skip
        return torch.cat(parts, dim=1)

    def reduce_to_owner(self, layer: int, local: torch.Tensor | None,
                        shape: tuple[int, ...]) -> torch.Tensor | None:  # fmt: skip
        """Sum of every rank's ``local`` (None: adds nothing) on the layer's owner, fp64 on the
        CPU; None elsewhere. Collective over the world."""
        total = torch.zeros(shape, dtype=torch.float64, device=self.device)
        if local is not None:
            total += local.to(self.device, torch.float64)
        if self.world > 1:
            torch.distributed.reduce(total, dst=self.owners[layer])
        return total.cpu() if self.rank == self.owners[layer] else None

    def sum_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        """SUM over the DP group (each replica filled only its own windows' places)."""
        if self.dp == 1:
            return values
        from megatron.core import parallel_state as ps

        values = values.to(self.device)
        torch.distributed.all_reduce(values, group=ps.get_data_parallel_group())
        return values.cpu()

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank, so every rank's search takes the same branch."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(t, src=0)
        return float(t.cpu())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
