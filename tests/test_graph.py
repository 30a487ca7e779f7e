"""Interaction graph, thresholds, Louvain modularity and GraphML export."""

import math

import networkx as nx
import numpy as np
import pytest
import torch
from networkx.algorithms.community import modularity as nx_modularity

from evaluation.metrics.graph import edge_threshold, interaction_graph, modularity, set_communities, write_graphml

E3 = torch.tensor([[9.0, 9.0, 9.0], [9.0, 4.0, 1.0], [9.0, 3.0, 2.0]], dtype=torch.float64)


def test_threshold_and_weights_hand_computed():
    # non-constant edges 4, 3, 2, 1 (total 10): 90 % needs 4, 3, 2; the largest dropped edge is 1
    assert edge_threshold(E3, 0.9) == 1.0
    assert edge_threshold(E3, 0.99) == 0.5  # nothing dropped: half the smallest kept edge
    G = interaction_graph({"a": E3, "b": torch.ones(2, 3)}, ["a", "b", "out"], keep_fraction=0.9)
    assert G.graph["epsilon"] == {"a": 1.0}
    assert sorted(G.nodes) == ["a:1", "a:2", "b:1", "b:2"]  # constant nodes and output layer left out
    assert G.nodes["b:2"] == {"layer": "b", "layer_index": 1, "index": 2}
    # E[i, j] is the edge from input feature j to output feature i
    want = {("a:1", "b:1"): math.log10(4), ("a:1", "b:2"): math.log10(3), ("a:2", "b:2"): math.log10(2)}
    got = {tuple(sorted(e)): w for *e, w in G.edges(data="weight")}
    assert got == pytest.approx(want)
    G2 = interaction_graph({"a": E3, "b": torch.ones(2, 3)}, ["a", "b", "out"], thresholds={"a": 2.5})
    assert sorted(tuple(sorted(e)) for e in G2.edges) == [("a:1", "b:1"), ("a:1", "b:2")]


def block_diagonal_edges(sizes, n_layers, seed=0):
    """E for each section: constant row/column, blocks of positive weights, tiny off-block noise."""
    rng = np.random.default_rng(seed)
    k = 1 + sum(sizes)
    mask = np.zeros((k, k), dtype=bool)
    start = 1
    for s in sizes:
        mask[start:start + s, start:start + s] = True
        start += s
    edges = {}
    for l in range(n_layers):
        E = np.where(mask, rng.uniform(1.0, 3.0, (k, k)), rng.uniform(0, 1e-9, (k, k)))
        E[0, :], E[:, 0] = 5.0, 5.0
        edges[f"L{l}"] = torch.tensor(E)
    return edges


def test_block_diagonal_edges_give_the_blocks_as_communities():
    sizes = (3, 2, 4)
    edges = block_diagonal_edges(sizes, 3)
    layers = ["L0", "L1", "L2", "out"]
    G = interaction_graph(edges, layers)
    assert G.number_of_nodes() == 3 * sum(sizes)
    truth, start = [], 1
    for s in sizes:
        truth.append({f"L{l}:{i}" for l in range(3) for i in range(start, start + s)})
        start += s
    for gamma in (0.5, 1.0):
        Q, communities = modularity(G, resolution=gamma, seed=0)
        assert sorted(map(sorted, communities)) == sorted(map(sorted, truth))
        assert Q == pytest.approx(nx_modularity(G, truth, weight="weight", resolution=gamma))
    # disconnected blocks: Q = sum_c (1 - gamma * share_c) * share_c, share_c = (degree sum)/(2m)
    Q1, _ = modularity(G, 1.0)
    shares = [sum(d for _, d in G.degree(c, weight="weight")) / (2 * G.size(weight="weight")) for c in truth]
    assert Q1 == pytest.approx(sum(s - s * s for s in shares))


def test_empty_graph_and_bad_input():
    G = interaction_graph({"a": torch.zeros(3, 3)}, ["a", "out"])
    Q, communities = modularity(G)
    assert math.isnan(Q) and communities == [{"a:1"}, {"a:2"}]
    with pytest.raises(KeyError, match=r"no edges for node layer\(s\) \['b'\]"):
        interaction_graph({"a": E3}, ["a", "b", "out"])
    with pytest.raises(ValueError, match=r"need at least two node layers"):
        interaction_graph({"a": E3}, ["a"])
    with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\], got 0"):
        edge_threshold(E3, 0)


def test_graphml_round_trip(tmp_path):
    edges = block_diagonal_edges((2, 2), 2)
    G = interaction_graph(edges, ["L0", "L1", "out"])
    _, communities = modularity(G)
    set_communities(G, communities)
    path = tmp_path / "graph.graphml"
    write_graphml(G, path)
    H = nx.read_graphml(path)
    assert set(H.nodes) == set(G.nodes) and H.number_of_edges() == G.number_of_edges()
    for n in G.nodes:
        assert H.nodes[n] == G.nodes[n]  # layer, layer_index, index, community
    u, v, w = next(iter(G.edges(data="weight")))
    assert H.edges[u, v]["weight"] == pytest.approx(w)
