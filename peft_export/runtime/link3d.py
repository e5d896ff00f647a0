"""Planes of a stack linked into 3D objects by their overlap (``predict --auto --3d``), numpy only.

As micro-sam's ``merge_instance_segmentation_3d`` (defaults: beta 0.5, no gap closing, no minimum z extent):

1. The planes' labels get ids unique across the stack.
2. An edge from object ``a`` in plane z to object ``b`` in plane z + 1 for every pair that shares pixels, scored by
   the fraction of ``a``'s pixels inside ``b`` (elf's ``compute_edges_from_overlap``).
3. Edge weights ``1 - log((1 - p) / p)`` with ``p = 0.998 * score + 0.001`` (elf's ``compute_edge_costs`` as
   micro-sam uses it): positive (attractive) above an overlap of about 0.27.
4. Objects joined by partitioning that graph (micro-sam solves this multicut with bioimage-cpp's decomposer and
   Kernighan-Lin; here greedy additive edge contraction, the standard multicut heuristic: the most attractive edge
   is contracted first, parallel edges' weights are summed, until no positive edge is left). On the chains of
   overlapping nuclei that stacks give, both keep every positive edge whose component has no repulsive edge.
5. Ids 1..N (3D objects), 0 background.
"""

from __future__ import annotations

import heapq

import numpy as np

P_MIN = 0.001


def consecutive_ids(stack: np.ndarray) -> np.ndarray:
    """(Z, H, W) per-plane labels -> ids unique across the stack (each plane's 1..n shifted), int64."""
    out = np.zeros(stack.shape, np.int64)
    offset = 0
    for z, plane in enumerate(stack):
        ids, inv = np.unique(plane, return_inverse=True)
        has_bg = ids[0] == 0
        new = np.arange(len(ids), dtype=np.int64) + offset + (0 if has_bg else 1)
        if has_bg:
            new[0] = 0
        out[z] = new[inv.reshape(plane.shape)]
        offset = int(out[z].max(initial=offset))
    return out


def overlap_edges(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (E, 2) between objects of consecutive planes and their score: |a ∩ b| / |a| (a in the lower plane)."""
    sizes = np.bincount(stack.ravel())
    uv, score = [], []
    for z in range(len(stack) - 1):
        a, b = stack[z].ravel(), stack[z + 1].ravel()
        both = (a > 0) & (b > 0)
        if not both.any():
            continue
        pairs, counts = np.unique(np.stack([a[both], b[both]], 1), axis=0, return_counts=True)
        uv.append(pairs)
        score.append(counts / sizes[pairs[:, 0]])
    if not uv:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    return np.concatenate(uv), np.concatenate(score)


def edge_weights(score: np.ndarray) -> np.ndarray:
    p = (1 - 2 * P_MIN) * np.asarray(score, np.float64) + P_MIN
    return 1.0 - np.log((1 - p) / p)


def greedy_additive(n: int, uv: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Greedy additive edge contraction: node -> cluster representative (n nodes)."""
    adj: list[dict[int, float]] = [dict() for _ in range(n)]
    for (u, v), w in zip(uv.tolist(), weights.tolist()):
        if u != v:
            adj[u][v] = adj[u].get(v, 0.0) + w
            adj[v][u] = adj[v].get(u, 0.0) + w
    parent = list(range(n))
    heap = [(-w, u, v) for u in range(n) for v, w in adj[u].items() if u < v and w > 0]
    heapq.heapify(heap)
    while heap:
        negw, u, v = heapq.heappop(heap)
        if parent[u] != u or parent[v] != v or adj[u].get(v) != -negw:
            continue  # stale: a contracted node, or a weight changed since
        if len(adj[u]) < len(adj[v]):
            u, v = v, u
        parent[v] = u  # contract v into u
        del adj[u][v]
        for k, w in adj[v].items():
            if k == u:
                continue
            del adj[k][v]
            adj[u][k] = adj[k][u] = adj[u].get(k, 0.0) + w
            if adj[u][k] > 0:
                heapq.heappush(heap, (-adj[u][k], min(u, k), max(u, k)))
        adj[v] = {}
    root = np.arange(n)
    for i in range(n):
        r = i
        while parent[r] != r:
            r = parent[r]
        root[i] = r
    return root


def link_planes(planes) -> np.ndarray:
    """(Z, H, W) per-plane instance labels -> (Z, H, W) uint32 3D objects (ids 1..N, 0 background)."""
    stack = consecutive_ids(np.asarray(planes))
    n = int(stack.max(initial=0)) + 1
    uv, score = overlap_edges(stack)
    root = greedy_additive(n, uv, edge_weights(score)) if len(uv) else np.arange(n)
    root[0] = 0
    _, new = np.unique(root, return_inverse=True)  # background (root 0) stays 0: the smallest root
    return new.astype(np.uint32)[stack]
