"""Measurements of a trained model or of its LIB fit: gradient alignment, on/off-manifold
robustness, the interaction graph and its modularity, the local learning coefficient, Fourier
content, and the summary of a LIB/PCA fit (feature counts, edge sparsity)."""
