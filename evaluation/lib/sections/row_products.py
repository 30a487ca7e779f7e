"""∑_r (P diag(d_r) Q diag(f_r))², the per-row products of a position-wise section's edges (position_wise.py).

P (k_out × H) and Q (H × k_in) are fixed; d_r (H) and f_r (k_in) change per row r. Each row's
G_r = P diag(d_r) Q costs k_out · nnz(d_r) · k_in multiply-adds, which is the bulk of a fit's
arithmetic on an MLP. A ``RowPlan``, made once per batch from the d_r and shared by every basis,
picks the cheapest of three ways to form the G_r:

* ``dense``: all H units of every row (d_r has few zeros, e.g. GELU);
* ``active``: only the units with d_r ≠ 0 (ReLU: about half), rows sorted by that count;
* ``chain``: rows walked in an order where consecutive d_r differ in few units (greedy nearest
  neighbour on the zero pattern, within blocks of ``WALK_BLOCK`` rows); G_r = G_{r−1} + P diag(d_r −
  d_{r−1}) Q, restarted from scratch every ``ANCHOR`` rows so rounding cannot build up. On rib's
  modular-addition MLP (512 ReLU units, about 286 active per row) consecutive rows differ in
  about 86 units, so this needs about a third of the ``active`` work.

Every way gives the same sums up to float64 rounding (the chain adds at most ``ANCHOR`` terms).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

F64 = torch.float64
ANCHOR = 32        # rows per chain segment (the first is computed from scratch)
WALK_BLOCK = 512   # rows ordered together (a WALK_BLOCK² distance matrix)
CHAIN_BELOW = 0.7  # the chain is used when it needs less than this share of the active-units work
DENSE_ABOVE = 0.75  # more than this share of d ≠ 0: every unit (dense products are faster)


class RowPlan:
    """How to form the G_r of one batch; ``kind`` is "dense", "active" or "chain" (the cheapest, see
    the module docstring; ``force`` picks one, e.g. for tests)."""

    def __init__(self, d: Tensor, force: str | None = None):
        if force not in (None, "dense", "active", "chain"):
            raise ValueError(f"force must be None, 'dense', 'active' or 'chain', got {force!r}")
        self.d = d
        nonzero = d != 0
        self.kind = "dense"
        if force == "dense" or (force is None and nonzero.double().mean() > DENSE_ABOVE):
            return
        self.kind = "active"
        self.sparse = _by_count(nonzero)
        if force == "active":
            return
        walk = _walk(nonzero)
        dw = d[walk]
        cont = (torch.arange(d.shape[0], device=d.device) % ANCHOR != 0).to(d.dtype)  # 0 where a run starts
        delta = dw.clone()
        delta[1:] -= dw[:-1] * cont[1:, None]
        if force == "chain" or (delta != 0).sum() < CHAIN_BELOW * nonzero.sum():
            self.kind, self.walk, self.delta = "chain", walk, delta


def _by_count(nonzero: Tensor):
    """(rows ordered by their number of nonzero units, each row's nonzero units first, that number in
    the same order)."""
    count = nonzero.sum(1)
    order = torch.argsort(count)
    active = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)
    return order, active, count[order]


def _walk(nonzero: Tensor) -> Tensor:
    """Row order where consecutive rows differ in few units: within each block of WALK_BLOCK rows,
    greedy nearest neighbour in Hamming distance of the zero patterns, from the block's first row."""
    pieces = []
    for start in range(0, nonzero.shape[0], WALK_BLOCK):
        z = nonzero[start:start + WALK_BLOCK].to(torch.float32)
        dist = (z @ (1 - z).T + (1 - z) @ z.T).cpu().numpy()
        n = dist.shape[0]
        np.fill_diagonal(dist, np.inf)
        order, cur = [0], 0
        for _ in range(n - 1):
            dist[:, cur] = np.inf
            cur = int(np.argmin(dist[cur]))
            order.append(cur)
        pieces.append(torch.as_tensor(order, device=nonzero.device) + start)
    return torch.cat(pieces)


def _gathered(values: Tensor, PT: Tensor, Q: Tensor, rs: Tensor, active: Tensor, m: int, dtype, scale=None):
    """G_r (c, k_out, k_in) for rows ``rs`` from their first m units in ``active`` (values past a
    row's count are 0); columns scaled by ``scale[rs]`` when given."""
    c = rs.shape[0]
    if m == 0:  # rows without a unit to add (d_r = 0, or a chain step that changes nothing)
        return torch.zeros(c, PT.shape[1], Q.shape[1], dtype=Q.dtype, device=Q.device)
    idx = active[rs, :m].reshape(-1)
    Qg = Q.index_select(0, idx).view(c, m, Q.shape[1])
    Qg.mul_(values[rs.unsqueeze(1), idx.view(c, m)].to(dtype).unsqueeze(-1))
    if scale is not None:
        Qg.mul_(scale[rs][:, None, :])
    return torch.bmm(PT.index_select(0, idx).view(c, m, PT.shape[1]).transpose(1, 2), Qg)


def squared_products(plan: RowPlan, P: Tensor, Q: Tensor, f: Tensor, chunk_elements: int,
                     dtype: torch.dtype = F64) -> Tensor:
    """∑_r (P diag(d_r) Q diag(f_r))² (k_out × k_in, float64); products in ``dtype``."""
    k_out, hidden = P.shape
    k_in = Q.shape[1]
    P_d, Q_d, f = P.to(dtype), Q.to(dtype), f.to(dtype)
    E = torch.zeros(k_out, k_in, dtype=F64, device=P.device)
    if plan.kind == "dense":
        size = max(1, min(chunk_elements, 2 ** 19) // max(1, k_out * hidden))  # small chunks stay in cache
        for start in range(0, f.shape[0], size):
            dd, ff = plan.d[start:start + size].to(dtype), f[start:start + size]
            G = ((P_d[None] * dd[:, None, :]).reshape(-1, hidden) @ Q_d).reshape(dd.shape[0], k_out, -1)
            E += G.mul_(ff[:, None, :]).square_().sum(0).to(F64)
        return E
    PT = P_d.T.contiguous()  # (H, k_out): its rows are gathered
    size = max(1, min(chunk_elements, 2 ** 17) // max(1, k_out * k_in))
    if plan.kind == "active":
        order, active, width = plan.sparse
        for start in range(0, order.shape[0], size):
            G = _gathered(plan.d, PT, Q_d, order[start:start + size], active, int(width[start:start + size].max()),
                          dtype, f)
            E += G.square_().sum(0).to(F64)
        return E
    # chain: segments of whole anchored runs, each run's increments summed up in place
    segment = max(ANCHOR, min(chunk_elements, 2 ** 22) // max(1, k_out * k_in) // ANCHOR * ANCHOR)
    f_walk = f[plan.walk]
    for seg in range(0, plan.walk.shape[0], segment):
        delta = plan.delta[seg:seg + segment]
        order, active, width = _by_count(delta != 0)
        G = torch.empty(delta.shape[0], k_out, k_in, dtype=dtype, device=P.device)
        for start in range(0, order.shape[0], size):
            rs = order[start:start + size]
            G[rs] = _gathered(delta, PT, Q_d, rs, active, int(width[start:start + size].max()), dtype)
        full = G.shape[0] // ANCHOR * ANCHOR
        runs = G[:full].view(-1, ANCHOR, k_out * k_in)
        for i in range(1, ANCHOR):  # running sums, every run at once (faster than torch.cumsum here)
            runs[:, i].add_(runs[:, i - 1])
            if full + i < G.shape[0]:
                G[full + i].add_(G[full + i - 1])
        E += G.mul_(f_walk[seg:seg + segment][:, None, :]).square_().sum(0).to(F64)
    return E


__all__ = ["ANCHOR", "RowPlan", "squared_products"]
