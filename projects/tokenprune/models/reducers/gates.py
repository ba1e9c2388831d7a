"""Per-token gates that learned-gate reducers share: each maps tokens (B, N, C) to (keep, prune)
log-probabilities (B, N, 2), class 0 = keep.

- :class:`MLPGate`: SViT's 2-layer MLP on the token's own feature (Liu et al., WACV 2024).
- :class:`LocalGlobalGate`: DynamicViT's local + global predictor (Rao et al., NeurIPS 2021, ``PredictorLG``
  of its official code), which adds the mean feature of the tokens still kept.

Both take ``(x, policy)``; :class:`MLPGate` ignores the policy. Parameter names are those of the official
codes' modules, so converted weights load as they are. :func:`sample_keep` draws the training decision from
their log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KEEP = 0  # the gates' class index of "keep"
PRUNE = 1  # and of "prune"


class MLPGate(nn.Module):
    """SViT's gate: LayerNorm -> Linear(C, C/4) -> GELU -> Linear(C/4, 2) -> log-softmax, class 0 = keep.

    Args:
        dim: Token channels C.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim // 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim // 4, 2)

    def logits(self, x: Tensor) -> Tensor:
        """Tokens (B, N, C) -> the two raw outputs per token (B, N, 2), before the log-softmax."""
        return self.fc2(self.act(self.fc1(self.norm(x))))

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        """Tokens (B, N, C) -> log-probabilities (B, N, 2) of (keep, prune); ``policy`` is not used."""
        return F.log_softmax(self.logits(x), dim=-1)

    def macs_per_token(self) -> int:
        """Multiply-accumulates of the linear layers for one token."""
        return linear_macs(self)


class LocalGlobalGate(nn.Module):
    """DynamicViT's local+global prediction module: LayerNorm -> Linear(C, C) -> GELU gives per-token
    features, whose first half (local) is concatenated with the policy-weighted mean of the second half over
    the kept tokens (global); an MLP C -> C/2 -> C/4 -> 2 with GELUs and a log-softmax follows.

    Args:
        dim: Token channels C (even).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        """Tokens (B, N, C) and their policy (B, N) (1 = kept, may carry gradients; None: all kept) -> (B, N, 2)
        log-probabilities of (keep, prune)."""
        x = self.in_conv(x)
        C = x.shape[-1]
        if policy is None:
            global_x = x[..., C // 2 :].mean(dim=1, keepdim=True)
        else:
            w = policy.unsqueeze(-1)
            global_x = (x[..., C // 2 :] * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([x[..., : C // 2], global_x.expand_as(x[..., C // 2 :])], dim=-1))

    def macs_per_token(self) -> int:
        """Multiply-accumulates of the linear layers for one token."""
        return linear_macs(self)


def sample_keep(log_p: Tensor, tau: float = 1.0) -> Tensor:
    """Gate log-probabilities (B, N, 2) -> hard Gumbel-softmax keep decision (B, N) in {0, 1}, with
    straight-through gradients (the training decision of SViT and DynamicViT)."""
    return F.gumbel_softmax(log_p, tau=tau, hard=True, dim=-1)[..., KEEP]


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates of every linear layer of ``module`` for one token."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


GATES: dict[str, type[nn.Module]] = {"mlp": MLPGate, "local_global": LocalGlobalGate}
