"""Where training metrics go (rank 0 only): ``OUT/metrics.jsonl`` always, TensorBoard event files
in ``OUT/tensorboard`` and a wandb run in ``OUT/wandb`` when asked. wandb runs offline unless
the user sets ``WANDB_MODE=online`` (``wandb sync`` uploads an offline run later), so training
never needs the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_prune.checkpoint.atomic import write_text_atomic
from megatron_prune.errors import UserError
from megatron_prune.log import is_rank0


class MetricsSink:
    def __init__(
        self,
        out: Path,
        *,
        tensorboard: bool,
        wandb_project: str | None,
        run_config: dict,
        history: list[dict] | None = None,
    ) -> None:
        self.enabled = is_rank0()
        self.path = out / "metrics.jsonl"
        self.history = list(history or [])
        self.tb = self.wandb_run = None
        if not self.enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise UserError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from err
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise UserError(
                    "--wandb-project needs wandb: pip install 'megatron-prune[wandb]'"
                ) from err
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=wandb_project, dir=str(out), config=run_config, resume="allow",
                id=run_config.get("run_id"),
            )  # fmt: skip
        self._rewrite()  # a resumed run drops records past its checkpoint

    def log(self, record: dict) -> None:
        """``record`` has "step" and scalar metrics."""
        self.history.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for name, value in record.items():
            if name != "step" and self.tb is not None:
                self.tb.add_scalar(name, value, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.history))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
