"""The per-row products of a position-wise section's edges (evaluation.lib.sections.row_products):
every way of forming them (dense, active units, chain) against the naive per-row sum."""

import pytest
import torch

from evaluation.lib.sections.row_products import ANCHOR, WALK_BLOCK, RowPlan, squared_products

F64 = torch.float64


def naive(P, d, Q, f):
    return sum((P @ torch.diag(d_r) @ Q * f_r).pow(2) for d_r, f_r in zip(d, f))


def relu_like(rows: int, hidden: int, seed: int, values=(1.0,)):
    """d_r: rows of a ReLU-like derivative (0 or one of ``values``), in a few clusters (so the chain pays),
    with exact repeats (chain steps that change nothing) and an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(4, hidden, generator=g) < 0.5
    pick = torch.randint(0, 4, (rows,), generator=g)
    flip = torch.rand(rows, hidden, generator=g) < 0.1
    on = centres[pick] ^ flip
    if rows > 2:
        on[1] = on[0]
        on[2] = False
    vals = torch.tensor(values, dtype=F64)[torch.randint(0, len(values), (rows, hidden), generator=g)]
    return on.to(F64) * vals


@pytest.mark.parametrize("kind", ["dense", "active", "chain", None])
@pytest.mark.parametrize("rows", [1, ANCHOR - 3, 3 * ANCHOR + 5, WALK_BLOCK + ANCHOR + 7])
def test_every_way_matches_the_naive_sum(kind, rows):
    g = torch.Generator().manual_seed(rows)
    k_out, hidden, k_in = 6, 40, 5
    P, Q = torch.randn(k_out, hidden, generator=g, dtype=F64), torch.randn(hidden, k_in, generator=g, dtype=F64)
    d = relu_like(rows, hidden, rows, values=(1.0, 0.5))
    f = torch.randn(rows, k_in, generator=g, dtype=F64)
    plan = RowPlan(d, force=kind)
    if kind is not None:
        assert plan.kind == kind
    # small chunks and segments: several of each, and segments that end inside a run
    for chunk_elements in (2 ** 22, 3 * k_out * k_in):
        got = squared_products(plan, P, Q, f, chunk_elements)
        want = naive(P, d, Q, f)
        assert got.dtype == F64
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


def test_the_chain_is_chosen_where_rows_differ_little():
    d = relu_like(300, 64, 0)
    assert RowPlan(d).kind == "chain"
    g = torch.Generator().manual_seed(1)
    scattered = (torch.rand(300, 512, generator=g) < 0.5).to(F64)  # independent rows: nothing to share
    assert RowPlan(scattered).kind == "active"
    assert RowPlan(torch.rand(300, 64, generator=g, dtype=F64) + 0.1).kind == "dense"  # no zeros (GELU-like)


def test_bad_force():
    with pytest.raises(ValueError, match="force must be"):
        RowPlan(torch.ones(2, 3, dtype=F64), force="sparse")
