"""Tangent spaces for gradient alignment and robustness: the data module's provider for real-valued
inputs, local PCA of the token embeddings for token models (see ``embedding_tangents``)."""

from __future__ import annotations

import math

import torch

from evaluation.compare.data import subset
from evaluation.compare.options import MeasureOptions


def tangent_provider(datamodule, kind: str):
    """The tangent provider ``kind`` ("auto": exact with a known generator, else local PCA)."""
    if kind == "auto":
        kind = "exact" if getattr(datamodule, "generator", None) is not None else "local_pca"
    if callable(getattr(datamodule, "tangent_provider", None)):
        return datamodule.tangent_provider(kind)
    from interp_train.tangents import fit_from_datamodule

    return fit_from_datamodule(kind, datamodule)


EMBED_SITE = "hook_embed"


def record_flat(module, inputs: torch.Tensor, site: str, batch_size: int) -> torch.Tensor:
    """The activation at ``site`` for every row of ``inputs``, flattened per example: (N, d)."""
    from interp_train.sites import run_model

    rows = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            act = run_model(module, inputs[start:start + batch_size], record=[site]).activations[site]
            rows.append(act.detach().reshape(act.shape[0], -1))
    return torch.cat(rows)


def embedding_tangents(module, train_inputs: torch.Tensor, options: MeasureOptions):
    """(LocalPCATangents, info) on the flattened ``hook_embed`` activations of up to
    ``options.embed_reference`` training inputs (seeded subset).

    The provider's points are e_i = flatten(hook_embed(x_i)) ∈ R^{T·d_model}; U(e) spans the top
    k principal directions of the ``embed_n_neighbors`` nearest reference embeddings of e, with k
    the fewest directions explaining ``embed_explained_variance`` of the local variance averaged
    over 256 probes (chosen once). info: site, n_reference, n_neighbors, explained_variance,
    k, d, baseline = sqrt(k/d), the explained-variance curve up to k, the mean ||e|| and the
    median distance of a reference embedding to its nearest other one (the scale that the
    robustness radii ε compare with), and the fraction of pairs among each probe's neighbours
    that differ from it in exactly one token position.
    """
    from interp_train.tangents import LocalPCATangents

    reference = subset((train_inputs,), options.embed_reference, options.seed)[0]
    n = reference.shape[0]
    if n < 4:
        raise ValueError(f"embedding tangents need at least 4 training inputs, got {n}")
    n_neighbors = min(options.embed_n_neighbors, n - 2)
    points = record_flat(module, reference, EMBED_SITE, options.batch_size)
    tangents = LocalPCATangents(points, n_neighbors=n_neighbors, explained_variance=options.embed_explained_variance,
                                seed=options.seed)
    probe = points[: min(256, n)]
    dist = torch.cdist(probe, points)
    dist[torch.arange(probe.shape[0]), torch.arange(probe.shape[0])] = math.inf  # not its own neighbour
    near = dist.topk(n_neighbors, dim=1, largest=False).indices
    tokens_differ = (reference[near] != reference[: probe.shape[0], None]).reshape(*near.shape, -1).sum(dim=-1)
    k, d = tangents.dim, points.shape[1]
    info = {"site": EMBED_SITE, "provider": repr(tangents), "n_reference": n, "n_neighbors": n_neighbors,
            "explained_variance": options.embed_explained_variance, "k": k, "d": d, "baseline": math.sqrt(k / d),
            "explained_variance_curve": [float(v) for v in tangents.explained_variance_curve[:k]],
            "mean_embedding_norm": float(points.norm(dim=1, dtype=torch.float64).mean()),
            "median_nearest_distance": float(dist.min(dim=1).values.median()),
            "neighbours_one_token_change": float((tokens_differ == 1).to(torch.float64).mean())}
    return tangents, info
