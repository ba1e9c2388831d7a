"""BAT: keep the attentive tokens, cluster and merge the inattentive ones, match homogeneous attentive pairs.

Long et al., "Beyond Attentive Tokens: Incorporating Token Importance and Diversity for Efficient Vision
Transformers", CVPR 2023. No trainable parameters, no public code. In each reducing
block (default 3, 6, 9), between attention and MLP, per image:

1. **Decouple**: the K = ceil(keep_ratio x n) patch tokens with the highest class-token attention (averaged
   over heads, as EViT) are attentive, the other n - K inattentive.
2. **Merge inattentive tokens**: simplified density-peak clustering (DPC-KNN) of the inattentive tokens'
   features: density rho_i = exp(-mean of the squared distances to its k nearest neighbours), delta_i = the
   distance to the nearest denser token (the largest distance for the densest), the Cn tokens with the
   highest rho x delta are centres, every token joins its nearest centre; each cluster becomes one token,
   the importance-weighted average of its members.
3. **Match homogeneous attentive tokens**: bipartite soft matching (ToMe's, on the keys averaged over
   heads) of the attentive tokens merges their Cn - 1 most similar pairs (A token -> most similar B token;
   as in ToMe, one B token may take several A tokens), each group into its importance-weighted average.

What we chose (the paper does not say, docs/reducers/bat.md):

- The count follows EViT's keep-rate schedule (BAT's published GMACs
  equal EViT's at the same keep rate): a block hands on K + 1 patch tokens, EViT's K attentive plus one
  fused token; BAT spends the one extra token on Cn clusters and pays for them by merging Cn - 1 attentive
  pairs. On DeiT-S at 224 with keep ratio 0.7 at blocks 3, 6, 9: 197 -> 140 -> 100 -> 72 tokens.
- Cn = ceil(cluster_ratio x (n - K)), at least 1, at most n - K and K // 2 + 1 (pairs are at most half of
  the attentive tokens); k = ``knn`` nearest neighbours (5, TCFormer's DPC-KNN default); features are the
  tokens after the attention residual; ties in density are broken by position, so results are
  deterministic; merge weights are the importance scores (EViT's fused token is weighted the same way).
- ``importance='cls'`` needs a backbone with ``cls_token=True``; ``importance='mean'`` (no class token)
  uses the attention a token receives averaged over all queries (weighted by their sizes) and heads.
- Dense-safe restore (``restore``): a matched attentive pair is copied back to both its positions (its members
  are near-duplicates, as in ToMe). An inattentive position merged into a cluster keeps its own value from
  before the block that clustered it (``'last'``, default; the cluster token only serves the attention of
  later blocks, as SViT keeps pruned tokens and EViT's ``restore='last'``), or takes its cluster's final
  value (``'merged'``). Clusters gather dissimilar tokens (about ten per cluster at Cn = 0.1 x inattentive),
  so ``'merged'`` overwrites a third of the map with cluster averages after block 3 and about two thirds
  after block 9: on the shapes data, training-free, it cost 0.304 -> 0.125 box mAP (docs/reducers/bat.md).
- ``prop_attn`` (off by default, BAT does not use it) adds ToMe's proportional attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .merging import (
    MergeState,
    MergingReducer,
    attention_importance,
    bipartite_soft_matching,
    merge_tokens,
)
from .toolkit import keep_count, mlp_half, topk_mask

DEFAULT_BLOCKS = (3, 6, 9)
DEFAULT_KEEP_RATIO = 0.7
DEFAULT_CLUSTER_RATIO = 0.1


@torch.no_grad()
def dpc_knn(x: Tensor, num_clusters: int, k: int) -> Tensor:
    """Simplified density-peak clustering with k nearest neighbours (DPC-KNN, as in TCFormer and BAT).

    Args:
        x: (B, T, C) token features.
        num_clusters: Cluster centres per image, 1 <= num_clusters <= T.
        k: Neighbours for the density (the token itself included, as TCFormer's code), clipped to T.

    Returns:
        (B, T) long, the cluster index in [0, num_clusters) of every token; every cluster holds its centre.
    """
    B, T, C = x.shape
    x = x.float()
    dist = torch.cdist(x, x).clamp(min=0) / math.sqrt(C)
    nearest = dist.topk(min(k, T), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    order = torch.arange(T, device=x.device)
    # denser[b, i, j]: j is denser than i (equal densities: the earlier token counts as denser)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (order[None, :] < order[:, None])
    )
    farthest = dist.flatten(1).max(dim=1).values[:, None, None]
    delta = torch.where(denser, dist, farthest).min(dim=-1).values
    centres = (delta * density).topk(num_clusters, dim=-1).indices  # (B, Cn)
    to_centre = dist.gather(1, centres.unsqueeze(-1).expand(-1, -1, T))  # (B, Cn, T)
    cluster = to_centre.argmin(dim=1)
    return cluster.scatter(1, centres, torch.arange(num_clusters, device=x.device).expand(B, -1))


def bat_plan(n: int, keep_ratio: float, cluster_ratio: float) -> tuple[int, int, int] | None:
    """Counts of one reducing block for n patch tokens: (K attentive, Cn clusters, Cn - 1 matched pairs), or
    None when the block would not reduce (K + 1 >= n). ``n`` may be a traced size (read as an int)."""
    n = int(n)
    k = keep_count(keep_ratio, n, min_keep=1)
    inattentive = n - k
    if inattentive <= 1:
        return None
    clusters = min(max(1, math.ceil(round(cluster_ratio * inattentive, 6))), inattentive, k // 2 + 1)
    return k, clusters, clusters - 1


class BATReducer(MergingReducer):
    """BAT (Long et al., CVPR 2023) for the dense ViT backbone; see the module docstring.

    Args:
        embed_dim: Token channels C of the backbone.
        blocks: Indices of the reducing blocks (default 3, 6, 9).
        keep_ratio: Per reducing block (or one for all), in (0, 1]: EViT's keep rate, the attentive fraction
            of the block's patch tokens (it hands on that many plus one). Default 0.7.
        cluster_ratio: Cluster centres per inattentive token, in (0, 1]. Default 0.1.
        knn: Neighbours k of the DPC-KNN density.
        importance: ``'cls'`` (class-token attention, the paper's; needs ``cls_token=True``) or ``'mean'``
            (mean attention received; no class token needed).
        prop_attn: Proportional attention once tokens were merged (not in the paper).
        restore: What a clustered (inattentive) position holds in the output map: ``'last'`` (its own value
            from before it was clustered) or ``'merged'`` (its cluster's final value).
    """

    def __init__(
        self,
        embed_dim: int,
        blocks: Sequence[int] = DEFAULT_BLOCKS,
        keep_ratio: float | Sequence[float] = DEFAULT_KEEP_RATIO,
        cluster_ratio: float = DEFAULT_CLUSTER_RATIO,
        knn: int = 5,
        importance: str = "cls",
        prop_attn: bool = False,
        restore: str = "last",
    ) -> None:
        if restore not in ("last", "merged"):
            raise ValueError(f"restore must be 'last' or 'merged', got {restore!r}")
        if not 0.0 < cluster_ratio <= 1.0:
            raise ValueError(f"cluster_ratio must be in (0, 1], got {cluster_ratio}")
        if int(knn) != knn or knn < 1:
            raise ValueError(f"knn must be a positive integer, got {knn}")
        super().__init__(embed_dim, blocks, keep_ratio, None, prop_attn, DEFAULT_KEEP_RATIO, importance)
        self.cluster_ratio = float(cluster_ratio)
        self.knn = int(knn)
        self.restore = restore

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, cluster_ratio={self.cluster_ratio}, knn={self.knn}, "
            f"importance={self.importance!r}, restore={self.restore!r}"
        )

    def reduce(self, index: int, block: nn.Module, x: Tensor, state: MergeState) -> Tensor | None:
        P = state.num_prefix
        B, M, C = x.shape
        n = M - P
        plan = bat_plan(n, self.budget(index)[1], self.cluster_ratio)
        if plan is None:
            return None
        k, clusters, pairs = plan
        half = self.importance_half(block, x, state)
        heads = half.attn.shape[1]
        importance = attention_importance(half.attn, state.size, P, self.importance) / heads  # (B, n)

        # attentive tokens first, each group in its original order
        order = torch.argsort((~topk_mask(importance, k)).to(torch.uint8), dim=1, stable=True)
        attentive, inattentive = order[:, :k], order[:, k:]
        keys = half.k.mean(dim=1)[:, P:]
        pair_assign = bipartite_soft_matching(
            keys.gather(1, attentive.unsqueeze(-1).expand(-1, -1, keys.shape[-1])), pairs
        )
        tokens = half.x[:, P:]
        cluster = dpc_knn(tokens.gather(1, inattentive.unsqueeze(-1).expand(-1, -1, C)), clusters, self.knn)

        num_out = P + k - pairs + clusters
        patch_assign = torch.empty(B, n, dtype=torch.long, device=x.device)
        patch_assign = patch_assign.scatter(1, attentive, P + pair_assign)
        patch_assign = patch_assign.scatter(1, inattentive, P + k - pairs + cluster)
        prefix = torch.arange(P, device=x.device).expand(B, P)
        assign = torch.cat([prefix, patch_assign], dim=1)
        weights = torch.cat([torch.ones(B, P, device=x.device), importance.float()], dim=1)
        merged = merge_tokens(half.x, assign, num_out, weights)
        state.apply(assign, num_out)
        if self.restore == "last":
            clustered = torch.zeros(B, M, dtype=torch.bool, device=x.device)
            clustered[:, P:] = clustered[:, P:].scatter(1, inattentive, torch.ones_like(inattentive, dtype=torch.bool))
            state.pin(clustered.gather(1, state.previous_source.clamp(min=0)) & (state.previous_source >= 0), x)

        d = keys.shape[-1]
        macs = (n - k) ** 2 * C + math.ceil(k / 2) * (k // 2) * d
        macs += self.importance_macs(M, C, heads)
        state.extra_macs = state.extra_macs + macs
        return mlp_half(block, merged)
