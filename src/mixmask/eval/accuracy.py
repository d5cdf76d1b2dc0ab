"""Top-k accuracy and the epoch-by-epoch record every classifier protocol reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@torch.no_grad()
def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)
                  ) -> dict[int, float]:
    """Percent of rows whose label is among the ``k`` highest ``scores`` [N, C], for each
    k (k above C counts as C: with fewer than 5 classes top-5 is 100)."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@dataclass
class EpochRecord:
    """Test top-1 / top-5 after every epoch; ``top1``/``top5`` are the last epoch's and
    ``best_*`` the epoch with the best top-1 (MoCo's ``main_lincls.py`` and Barlow Twins'
    ``evaluate.py`` report the best, which selects on the test split and is optimistic;
    we report both and say which is which)."""

    history: list[dict[str, float]] = field(default_factory=list)

    def add(self, epoch: int, top1: float, top5: float) -> None:
        self.history.append({"epoch": epoch, "top1": top1, "top5": top5})

    def summary(self) -> dict[str, float]:
        last = self.history[-1]
        best = max(self.history, key=lambda row: row["top1"])
        return {"top1": last["top1"], "top5": last["top5"], "best_top1": best["top1"],
                "best_top5": best["top5"], "best_epoch": best["epoch"],
                "reported": "top1/top5: last epoch; best_top1/best_top5: the epoch with the "
                            "best test top-1 (MoCo's convention, optimistic)"}
