"""A naive dense LIB reference for tests: all data at once, one example at a time, explicit loops.

It shares no code with lib.py/edges.py beyond ``run_model`` and the result dataclasses: every
matrix of docs/DESIGN.md §4.1 is built explicitly (Y, U, D, R, R⁺ = D^{1/2} Uᵀ Y⁻¹, M, V, Λ, C, C⁺) and
every Jacobian is the full dense ``torch.func.jacrev`` of one example, contracted with loops over
input positions s, output positions t and integration points α. Only exact (non-stochastic) fits.
Slow by design: use on tiny models only. Node layers may carry a position index ("site[i]"):
that layer is the one position (its moments, Jacobians and edges).

``forward`` supplies the activations and the per-example section Jacobians: by default
``RunModelForward`` (the model with ``run_model``'s site edits); ``evaluation.lib.explicit`` has one
that shares no code with ``run_model`` (an explicit forward of a TransformerLens transformer).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from interp_train.sites import run_model
from evaluation.lib.fit import LayerBasis, LIBConfig, LIBResult

F64 = torch.float64


def _inputs(data, input_fn):
    xs = [input_fn(b) if input_fn else (b[0] if isinstance(b, (tuple, list)) else b) for b in data]
    return torch.cat(xs)


class RunModelForward:
    """Activations and section Jacobians of ``model`` through ``run_model`` (record / edit a site)."""

    def __init__(self, model):
        self.model = model
        self.dtype = model_dtype(model)

    def _raw(self, x, site):
        with torch.no_grad():
            res = run_model(self.model, x, record=[] if site == "output" else [site])
        return res.output if site == "output" else res.activations[site]

    def activation(self, x, name):
        """(N, P, d) activation of ``name`` ("output": the logits); "site[i]": that position only (P = 1)."""
        site, pos = split_position(name)
        act = self._raw(x, site)
        if pos is not None:
            return act[:, pos].unsqueeze(1)
        # (N, P, d) for a sequence model; anything else, images and feature maps included, as one position
        return act if act.dim() == 3 else act.reshape(act.shape[0], 1, -1)

    def jacobian(self, x_one, l_in, l_out, f_in):
        """Dense Jacobian of f^{l+1} (P_out, d_out) w.r.t. f^l (P, d) of one example, at f^l = f_in.

        A position-indexed input layer replaces only that position (the others keep their clean
        values); a position-indexed output layer returns only that position."""
        model = self.model
        (s_in, p_in), (s_out, p_out) = split_position(l_in), split_position(l_out)
        clean = self._raw(x_one, s_in)

        def g(f):
            if p_in is None:
                new = f.reshape(clean.shape)
            else:
                rows = [clean[:, t] for t in range(clean.shape[1])]
                rows[p_in] = f.reshape(clean[:, p_in].shape)
                new = torch.stack(rows, dim=1)
            res = run_model(model, x_one, record=[] if s_out == "output" else [s_out], edit={s_in: lambda _a: new})
            out = res.output if s_out == "output" else res.activations[s_out]
            if p_out is not None:
                return out[0, p_out].reshape(1, -1)
            return out.reshape(-1, out.shape[-1]) if out.dim() == 3 else out.reshape(1, -1)

        return torch.func.jacrev(g)(f_in.to(self.dtype))  # (P_out, d_out, P, d)


def split_position(name):
    """(site, position or None) of "site" / "site[i]" (parsed here independently of evaluation.lib.positions)."""
    m = re.fullmatch(r"(.+)\[(-?\d+)\]", name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def _frame(acts, truncation, center=True):
    """Y, Y⁻¹, U_full, D_full from (N, P, d) activations, with an explicit covariance sum
    (center=False: the uncentred second moment and Y = I)."""
    rows = acts.reshape(-1, acts.shape[-1]).to(F64)
    mu = rows.mean(0)
    shift = mu if center else torch.zeros_like(mu)
    cov = torch.zeros(rows.shape[1], rows.shape[1], dtype=F64)
    for r in rows:
        cov += torch.outer(r - shift, r - shift)
    cov /= rows.shape[0]
    D, U = torch.linalg.eigh(cov)
    order = torch.argsort(D, descending=True)
    D, U = D[order], U[:, order]
    keep = D > truncation * D.max()
    D, U = D[keep], U[:, keep]
    d = rows.shape[1]
    Y = torch.eye(d + 1, dtype=F64)
    Y[0, 1:] = -shift
    U_full = torch.block_diag(torch.ones(1, 1, dtype=F64), U)
    D_full = torch.cat([torch.ones(1, dtype=F64), D])
    return mu, Y, torch.linalg.inv(Y), U_full, D_full


def _rule(config: LIBConfig):
    n = config.n_intervals
    if config.integration == "gradient":
        return [1.0], [1.0]
    if config.integration == "trapezoid":
        return [k / n for k in range(n + 1)], [(0.5 if k in (0, n) else 1.0) / n for k in range(n + 1)]
    x, w = np.polynomial.legendre.leggauss(n)
    return list((x + 1) / 2), list(w / 2)


def naive_fit_lib(model, data, node_layers, config: LIBConfig = LIBConfig(), input_fn=None,
                  forward=None) -> LIBResult:
    """Dense reference of evaluation.lib.fit.fit_lib (stochastic_sources=None only).

    forward: activations and Jacobians (``RunModelForward(model)`` when None)."""
    if config.stochastic_sources is not None:
        raise NotImplementedError("the naive reference covers exact Jacobians only")
    model.eval()
    forward = RunModelForward(model) if forward is None else forward
    x = _inputs(data, input_fn)
    acts = {n: forward.activation(x, n).to(F64) for n in node_layers}
    N = x.shape[0]
    lib, pca = {}, {}
    last = node_layers[-1]
    mu, Y, Y_inv, U_full, D_full = _frame(acts[last], config.truncation, config.center)
    if config.rotate_final:
        final = LayerBasis(last, Y @ U_full, U_full.T @ Y_inv, D_full, mu)
    else:
        rows = acts[last].reshape(-1, acts[last].shape[-1])
        d = rows.shape[1]
        final = LayerBasis(last, torch.eye(d + 1, dtype=F64), torch.eye(d + 1, dtype=F64),
                           torch.cat([torch.ones(1, dtype=F64), rows.pow(2).mean(0)]), mu)
    lib[last] = pca[last] = final
    for l_in, l_out in reversed(list(zip(node_layers[:-1], node_layers[1:]))):
        mu, Y, Y_inv, U_full, D_full = _frame(acts[l_in], config.truncation, config.center)
        pca[l_in] = LayerBasis(l_in, Y @ U_full, U_full.T @ Y_inv, D_full, mu)
        P, d = acts[l_in].shape[1:]
        C_next = lib[l_out].C[1:]  # rows multiplying f^{l+1}
        M_dash = torch.zeros(d + 1, d + 1, dtype=F64)
        for n in range(N):
            J = forward.jacobian(x[n:n + 1], l_in, l_out, acts[l_in][n]).to(F64)
            J_hat = torch.einsum("toSd,oi->tiSd", J, C_next)
            for s in range(P):
                for t in range(J_hat.shape[0]):
                    M_dash[1:, 1:] += J_hat[t, :, s, :].T @ J_hat[t, :, s, :]
        M_dash /= N * P
        R = Y @ U_full @ torch.diag(D_full ** -0.5)
        R_pinv = torch.diag(D_full ** 0.5) @ U_full.T @ Y_inv
        M = R_pinv @ M_dash @ R_pinv.T
        lam, V = torch.linalg.eigh(M[1:, 1:])
        order = torch.argsort(lam, descending=True)
        lam, V = lam[order], V[:, order]
        keep = lam > config.truncation * lam.max()
        lam, V = lam[keep], V[:, keep]
        Lam = torch.cat([M[0, 0].reshape(1), lam])
        # no derivative along the mean (Λ_0 ≤ truncation · max Λ): the constant column stays unscaled
        scale = torch.cat([Lam[:1] if Lam[0] > config.truncation * lam.max() else torch.ones(1, dtype=F64), lam])
        V_full = torch.block_diag(torch.ones(1, 1, dtype=F64), V)
        C = R @ V_full @ torch.diag(scale.sqrt())
        C_pinv = torch.diag(scale.rsqrt()) @ V_full.T @ R_pinv
        lib[l_in] = LayerBasis(l_in, C, C_pinv, Lam, mu)
    # the neuron basis: the unrotated layer, C = C⁺ = I, Lambda = [1, E[f_k²]]
    neuron = {}
    for name in node_layers:
        rows = acts[name].reshape(-1, acts[name].shape[-1])
        eye = torch.eye(rows.shape[1] + 1, dtype=F64)
        neuron[name] = LayerBasis(name, eye, eye.clone(), torch.cat([torch.ones(1, dtype=F64), rows.pow(2).mean(0)]),
                                  rows.mean(0))
    named = {"lib": lib, "pca": pca, "neuron": neuron}
    edges = {name: {} for name in named if name != "neuron" or config.neuron_edges}
    alphas, weights = _rule(config)
    for l_in, l_out in zip(node_layers[:-1], node_layers[1:]):
        P = acts[l_in].shape[1]
        E = {name: 0.0 for name in edges}
        for n in range(N):
            f = acts[l_in][n]
            Js = [forward.jacobian(x[n:n + 1], l_in, l_out, alpha * f).to(F64) for alpha in alphas]
            for name in edges:  # every basis from the same dense Jacobians
                C_in, C_pinv, C_out = named[name][l_in].C, named[name][l_in].C_pinv, named[name][l_out].C
                f_hat = torch.cat([torch.ones(P, 1, dtype=F64), f], 1) @ C_in  # (P, k_in)
                total = 0.0
                for J, w in zip(Js, weights):
                    # ∂ĥ_{t,i}/∂f̂_{s,j} = ∑_{o,d} C_out[1+o, i] J[t,o,s,d] C⁺[j, 1+d]
                    J_hat = torch.einsum("oi,toSd,jd->tiSj", C_out[1:], J, C_pinv[:, 1:])
                    term = torch.zeros(J_hat.shape[0], J_hat.shape[1], J_hat.shape[3], dtype=F64)
                    for s in range(P):
                        term += J_hat[:, :, s, :] * f_hat[s]
                    total = total + w * term
                for t in range(total.shape[0]):
                    E[name] = E[name] + total[t] ** 2
        for name, store in edges.items():
            store[l_in] = E[name] / (N * P)
    return LIBResult(list(node_layers), {"lib": lib, "pca": pca, "neuron": neuron}, edges, config)


def model_dtype(model) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32
