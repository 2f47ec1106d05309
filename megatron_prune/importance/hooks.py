"""Forward hooks that reduce sharded activations on the fly into sums in global index space.

Every statistic is a sum that the world can finish with one all-reduce (SUM), because each rank
adds only what no other rank adds:

* column-parallel activations (attention context before ``linear_proj``, FFN activations before
  ``linear_fc2``) cover this TP rank's heads / neurons: they land in that rank's slice of the
  global index space and every TP rank contributes;
* hidden-size activations (norm outputs, layer inputs/outputs) are either split along the
  sequence (sequence parallel: every TP rank adds its tokens) or replicated across TP (only TP
  rank 0 adds them);
* pipeline stages add their own layers; the hidden-channel score sums across stages;
* data-parallel replicas add their own samples.

Per-micro-batch reductions are computed in fp32 and accumulated in fp64. Nothing is stored per
token. Notation: s sequence (local to the rank under SP), b micro-batch, h hidden, n/g heads /
query groups, d head dim, f FFN size, t TP size, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from torch.distributed import ProcessGroup

from megatron_prune.models.arch import ModelArch

NORM_KINDS = ("input", "pre_mlp", "post_attn", "post_mlp")


@dataclass(frozen=True)
class RankView:
    """Where this rank sits, as the hooks need it."""

    tp: int
    tp_rank: int
    dp_rank: int
    sequence_parallel: bool
    tp_group: ProcessGroup

    @classmethod
    def current(cls, sequence_parallel: bool) -> RankView:
        return cls(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            sequence_parallel=sequence_parallel,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
        )

    @property
    def adds_hidden_stats(self) -> bool:
        """Whether this rank adds statistics of hidden-size (TP-replicated) activations."""
        return self.sequence_parallel or self.tp_rank == 0


def all_reduce_sum(t: torch.Tensor, device: torch.device, *, group: ProcessGroup) -> torch.Tensor:
    """SUM over ``group`` on ``device`` (NCCL wants GPU tensors, gloo CPU ones); returns a CPU
    copy.

    ``group`` is required and never None: torch reads None as "the whole world" while this
    project's losses once read it as "no reduction", so every caller names its group
    (``torch.distributed.group.WORLD`` for the world). Needs torch.distributed initialised.
    """
    if group is None:
        raise TypeError(
            "all_reduce_sum needs an explicit process group (torch.distributed.group.WORLD for "
            "the whole world; is torch.distributed initialised?)"
        )
    t = t.to(device).clone()
    torch.distributed.all_reduce(t, group=group)
    return t.cpu()


class Sums:
    """Named sums in global index space, on the activations' device (hooks never wait for the
    host). Hooks add fp32 values into fp32 partials; :meth:`flush`, once per forward call, moves
    the partials into fp64 totals, so long runs keep fp64 accuracy at fp32 cost per token."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.device = device

        def zeros(dtype: torch.dtype) -> dict[str, torch.Tensor]:
            return {k: torch.zeros(v, dtype=dtype, device=device) for k, v in shapes.items()}

        # every rank holds every sum, zero where it adds nothing, so one all-reduce finishes all
        self.tensors, self.partials = zeros(torch.float64), zeros(torch.float32)

    def add(self, name: str, index: tuple, value: torch.Tensor) -> None:
        self.partials[name][index] += value

    def flush(self) -> None:
        for name, partial in self.partials.items():
            self.tensors[name] += partial
            partial.zero_()

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = {k: v.to(self.device, torch.float64).clone() for k, v in tensors.items()}

    def all_reduced(self) -> dict[str, torch.Tensor]:
        """World-wide sums (collective), as CPU tensors: every rank added only its own share."""
        self.flush()
        world = torch.distributed.group.WORLD
        return {
            k: all_reduce_sum(self.tensors[k], self.device, group=world)
            for k in sorted(self.tensors)
        }


def _abs_sum(x: torch.Tensor) -> torch.Tensor:
    """sum over (s, b) of |x|, per channel, in one kernel."""
    return torch.linalg.vector_norm(x, ord=1, dim=(0, 1), dtype=torch.float32)


def _sq_sum(x: torch.Tensor) -> torch.Tensor:
    """sum over (s, b) of x^2, per channel."""
    return torch.linalg.vector_norm(x, ord=2, dim=(0, 1), dtype=torch.float32).square_()


def _cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-token cosine over the last dim, reading x and y three times in all (fewer passes
    and no [s, b, h] temporaries, unlike F.cosine_similarity)."""
    dot = torch.linalg.vecdot(x, y, dim=-1).float()
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32) * torch.linalg.vector_norm(
        y, dim=-1, dtype=torch.float32
    )
    return dot / norms.clamp_min(eps)


# the linear layer each pre-norm feeds (its output is that layer's whole input)
_NORM_FEEDS = {"input": "qkv_in", "pre_mlp": "fc1_in"}


def stat_shapes(arch: ModelArch, metrics: set[str]) -> dict[str, tuple[int, ...]]:
    """Every sum the chosen metrics need, with its global shape (the same list on every rank)."""
    L, h, f = arch.num_layers, arch.hidden_size, arch.ffn_hidden_size
    nd = arch.num_attention_heads * arch.head_dim
    n = arch.num_attention_heads
    kinds = NORM_KINDS if arch.post_norms else NORM_KINDS[:2]
    shapes: dict[str, tuple[int, ...]] = {}
    if "channel" in metrics:
        shapes["channel.abs_sum"] = (h,)
    if metrics & {"head", "group", "wanda", "flap"}:
        shapes["proj_in.sq_sum"] = (L, nd)
    if metrics & {"neuron", "wanda", "flap"}:
        shapes["fc2_in.sq_sum"] = (L, f)
    if "flap" in metrics:
        shapes.update({"proj_in.sum": (L, nd), "fc2_in.sum": (L, f)})
        shapes.update({"proj_w.sq_colsum": (L, nd), "fc2_w.sq_colsum": (L, f)})
    if "wanda" in metrics:
        shapes.update({"proj_w.abs_colsum": (L, nd), "fc2_w.abs_colsum": (L, f)})
        # the inputs of linear_qkv and linear_fc1 (their norms' outputs): unstructured Wanda
        shapes.update({"qkv_in.sq_sum": (L, h), "fc1_in.sq_sum": (L, h)})
    if "layer" in metrics:
        shapes["layer.cos_sum"] = (L,)
    if "post_norm" in metrics and arch.post_norms:
        shapes.update({"post_attn.inv_rms_sum": (L,), "post_mlp.inv_rms_sum": (L,)})
    if "minitron" in metrics:
        shapes.update({f"minitron.{k}": (L, h) for k in kinds})
        shapes.update(
            {"minitron.final": (1, h), "minitron.head": (L, n), "minitron.neuron": (L, f)}
        )
    return shapes


class ImportanceHooks:
    """Registers the hooks on this rank's model chunks; ``remove()`` takes them off.

    ``seq_len`` is the full (not sequence-parallel-local) length of every calibration sample.
    It is a required argument because the Minitron channel score divides by it: a forgotten
    value used to default to 0 and give infinite scores without any error.
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        arch: ModelArch,
        metrics: set[str],
        view: RankView,
        *,
        seq_len: int,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"ImportanceHooks needs the samples' length >= 1, got {seq_len}")
        self.arch, self.metrics, self.view = arch, metrics, view
        self.shapes = stat_shapes(arch, metrics)
        self.sums = Sums(self.shapes, next(chunks[0].parameters()).device)
        self.seq_len = seq_len
        self.handles: list = []
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                self._hook_layer(layer, layer.layer_number - 1)
            final = getattr(chunk.decoder, "final_layernorm", None)
            if final is not None:
                self._hook_norm(final, "final", 0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def add_weight_stats(self, chunks: list[torch.nn.Module]) -> None:
        """Column statistics of the row-parallel weights (Wanda, FLAP), added once per model
        replica (DP rank 0), each TP rank for its columns."""
        if self.view.dp_rank != 0 or not self.metrics & {"wanda", "flap"}:
            return
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                i = layer.layer_number - 1
                for key, linear in (
                    ("proj_w", layer.self_attention.linear_proj),
                    ("fc2_w", layer.mlp.linear_fc2),
                ):
                    w = linear.weight.detach().float()  # [h, cols/t]
                    cols = self._cols(w.shape[1])
                    if "wanda" in self.metrics:
                        self._add(f"{key}.abs_colsum", (i, cols), w.abs().sum(0))
                    if "flap" in self.metrics:
                        self._add(f"{key}.sq_colsum", (i, cols), w.pow(2).sum(0))

    # -- helpers -----------------------------------------------------------------------------

    def _add(self, name: str, index: tuple, value: torch.Tensor) -> None:
        self.sums.add(name, index, value)

    def _cols(self, local: int) -> slice:
        return slice(self.view.tp_rank * local, (self.view.tp_rank + 1) * local)

    def _tp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a per-sample partial over the sequence shards (sequence parallel only)."""
        if self.view.sequence_parallel and self.view.tp > 1:
            torch.distributed.all_reduce(t, group=self.view.tp_group)
        return t

    # -- hooks -------------------------------------------------------------------------------

    def _hook_layer(self, layer: torch.nn.Module, i: int) -> None:
        self._hook_norm(layer.input_layernorm, "input", i)
        self._hook_norm(layer.pre_mlp_layernorm, "pre_mlp", i)
        proj, fc2 = layer.self_attention.linear_proj, layer.mlp.linear_fc2
        if hasattr(proj, "post_norm"):
            self._hook_norm(proj.post_norm, "post_attn", i)
            self._hook_norm(fc2.post_norm, "post_mlp", i)
        self.handles.append(proj.register_forward_pre_hook(self._column_hook("proj_in", i, True)))
        self.handles.append(fc2.register_forward_pre_hook(self._column_hook("fc2_in", i, False)))
        if "layer" in self.metrics:
            self.handles.append(
                layer.register_forward_hook(self._influence_hook(i), with_kwargs=True)
            )

    def _hook_norm(self, norm: torch.nn.Module, kind: str, i: int) -> None:
        metrics = self.metrics

        def hook(_m: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            y = output.detach().float()  # [s, b, h]
            if self.view.adds_hidden_stats and "channel" in metrics:
                self._add("channel.abs_sum", (slice(None),), _abs_sum(y))
            fed = f"{_NORM_FEEDS[kind]}.sq_sum" if kind in _NORM_FEEDS else None
            if self.view.adds_hidden_stats and fed in self.shapes:
                self._add(fed, (i,), _sq_sum(y))
            if "minitron" in metrics:  # mean |y| over the sequence, then L2 over samples
                per_sample = self._tp_sum(y.abs().sum(0)) / self.seq_len  # [b, h]
                if self.view.tp_rank == 0:  # whole-sequence values now on every TP rank
                    self._add(f"minitron.{kind}", (i,), per_sample.pow(2).sum(0))
            if kind.startswith("post_") and f"{kind}.inv_rms_sum" in self.shapes:
                if self.view.adds_hidden_stats:
                    x = inputs[0].detach().float()
                    inv = torch.rsqrt(x.pow(2).mean(-1) + norm.eps)  # [s, b]
                    self._add(f"{kind}.inv_rms_sum", (i,), inv.sum())

        self.handles.append(norm.register_forward_hook(hook))

    def _column_hook(self, key: str, i: int, heads: bool):
        metrics, d = self.metrics, self.arch.head_dim
        needs_sq = f"{key}.sq_sum" in self.shapes

        def hook(_m: torch.nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float()  # [s, b, cols/t], full sequence even under SP
            cols = self._cols(x.shape[-1])
            if needs_sq:
                self._add(f"{key}.sq_sum", (i, cols), _sq_sum(x))
            if "flap" in metrics:
                self._add(f"{key}.sum", (i, cols), x.sum((0, 1)))
            if "minitron" in metrics:
                if heads:
                    s, b, c = x.shape
                    per_head = x.view(s, b, c // d, d).norm(dim=-1)  # [s, b, n/t]
                    local = per_head.mean(0).pow(2).sum(0)
                    self._add("minitron.head", (i, self._cols(c // d)), local)
                else:
                    self._add("minitron.neuron", (i, cols), x.abs().mean(0).pow(2).sum(0))

        return hook

    def _influence_hook(self, i: int):
        def hook(_m: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
            if not self.view.adds_hidden_stats:
                return
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = _cosine(h_in.detach(), h_out.detach())  # [s, b]
            self._add("layer.cos_sum", (i,), cos.sum())

        return hook
