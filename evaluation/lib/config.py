"""Settings of a LIB fit: the frozen, validated ``LIBConfig`` (docs/DESIGN.md §4, §4.10, §4.11)."""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.lib.edges import INTEGRATION_RULES, integration_rule

STOCHASTIC_OVER = ("positions", "positions_and_hidden")
JACOBIAN_DTYPES = (None, "float32", "float64")
JACOBIANS = ("auto", "structured", "autograd")


@dataclass(frozen=True)
class LIBConfig:
    """Settings of a LIB fit (validated on construction).

    truncation: relative threshold; eigenvalues ≤ truncation × (largest eigenvalue) are dropped,
        both for the activation covariance (step 2) and for the Jacobian Gram (step 4).
    center: subtract the mean (the constant feature then carries it); False uses the uncentred
        second moment E[fᵀf] in place of Cov(f).
    rotate_final: rotate the final node layer (e.g. logits) into its PCA basis; False keeps it in
        the neuron basis. Earlier bases do not depend on this choice (up to truncation).
    integration: rule for the edge attribution: "gradient" (α = 1), "trapezoid", "gauss-legendre".
    n_intervals: trapezoid intervals / Gauss–Legendre points (must be 1 for "gradient").
    stochastic_sources: number S of Rademacher probes for the Jacobian Gram M′ (unbiased);
        None computes it exactly. What they probe is set by ``stochastic_over``.
    stochastic_over: "positions": r ∈ {±1}^T per example and LIB feature of the next layer,
        S·k VJPs instead of T·k (exact with one output position); "positions_and_hidden":
        r ∈ {±1}^{T×k} per example, S VJPs in all (noisier, never exact for k > 1).
    edge_sources: number S of Rademacher probes over output positions for the edges: each E_ij
        estimates ∑_t (…)² by (1/S) ∑_r (∑_t r_t …)², S·k VJPs instead of T·k (unbiased, exact
        with one output position); None computes the edges exactly.
    seed: seed of the Rademacher probes (the edge probes use their own stream).
    jacobian_dtype: None computes the Jacobians (M′ and edge passes) in the model's own dtype;
        "float32" or "float64" uses a copy of the model in that dtype (float32: about 2x faster
        on CPU than a float64 model; sums, eigendecompositions and moments stay float64 on the
        original model).
    chunk_elements: bound on the elements of one batched vector-Jacobian product
        (cotangents × batch × positions × width); bounds memory, not the result.
    jacobians: how section Jacobians are computed. "auto": in closed form for the sections
        evaluation.lib.sections recognises (TransformerLens attention and MLP blocks with or
        without a LayerNorm in front, the unembedding, Linear/activation chains in an
        nn.Sequential), each checked against autograd on the first batch, and by autograd
        (backward passes) elsewhere;
        "structured": closed form or an error; "autograd": backward passes everywhere. The closed
        form is exact (float64, or ``jacobian_dtype`` float32 for the per-example edge products), so
        ``stochastic_sources`` and ``edge_sources`` only apply to the sections computed by autograd.
        LIBResult.methods records what each section used.
    neuron_edges: also compute the edges in the neuron basis (the unrotated layers, C = I; rib's
        "neuron" basis) next to LIB and PCA: LIBResult.edges["neuron"]. The neuron bases
        themselves are always in LIBResult.bases["neuron"].
    """

    truncation: float = 1e-12
    center: bool = True
    rotate_final: bool = False
    integration: str = "gradient"
    n_intervals: int = 1
    stochastic_sources: int | None = None
    stochastic_over: str = "positions"
    edge_sources: int | None = None
    seed: int = 0
    jacobian_dtype: str | None = None
    chunk_elements: int = 2 ** 22
    jacobians: str = "auto"
    neuron_edges: bool = True

    def __post_init__(self):
        if not (isinstance(self.truncation, (int, float)) and 0 <= self.truncation < 1):
            raise ValueError(f"truncation must be a number in [0, 1), got {self.truncation!r}")
        if self.integration not in INTEGRATION_RULES:
            raise ValueError(f"unknown integration {self.integration!r}; use one of {INTEGRATION_RULES}")
        integration_rule(self.integration, self.n_intervals)  # validates n_intervals
        if self.stochastic_sources is not None and (
                not isinstance(self.stochastic_sources, int) or self.stochastic_sources < 1):
            raise ValueError(f"stochastic_sources must be None or an integer >= 1, got {self.stochastic_sources!r}")
        if self.stochastic_over not in STOCHASTIC_OVER:
            raise ValueError(f"unknown stochastic_over {self.stochastic_over!r}; use one of {STOCHASTIC_OVER}")
        if self.edge_sources is not None and (
                isinstance(self.edge_sources, bool) or not isinstance(self.edge_sources, int) or self.edge_sources < 1):
            raise ValueError(f"edge_sources must be None or an integer >= 1, got {self.edge_sources!r}")
        if self.jacobian_dtype not in JACOBIAN_DTYPES:
            raise ValueError(f"unknown jacobian_dtype {self.jacobian_dtype!r}; use one of {JACOBIAN_DTYPES}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.chunk_elements, int) or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be an integer >= 1, got {self.chunk_elements!r}")
        if self.jacobians not in JACOBIANS:
            raise ValueError(f"unknown jacobians {self.jacobians!r}; use one of {JACOBIANS}")
        if not isinstance(self.neuron_edges, bool):
            raise ValueError(f"neuron_edges must be True or False, got {self.neuron_edges!r}")



__all__ = ["JACOBIANS", "JACOBIAN_DTYPES", "LIBConfig", "STOCHASTIC_OVER"]
