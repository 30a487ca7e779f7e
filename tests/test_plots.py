"""What the report figures draw: one colour per variant across a report's plots, verdicts clear
of the data, and the LIB/PCA graph drawing saying what it leaves out."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from evaluation.compare import plots as compare_plots
from evaluation.lib import plots as lib_plots


def _report(order):
    stats = lambda v: {"mean": 0.5, "std": 0.1, "values": [0.4, 0.6],
                       "comparison": None if v == "baseline" else {"diff": 0.1, "p": 0.01, "verdict": "✓"}}
    return {"task": "t", "baseline": "baseline",
            "metrics": [{"name": "acc", "label": "accuracy", "higher_is_better": True}],
            "variants": {v: {"metrics": {"acc": stats(v)}} for v in order}}


def _measurements(order):
    entry = {"details": {"alignment": {"fractions": [0.2, 0.5, 0.7], "baseline": 0.3},
                         "edge_curves": {"l0": {"n": [1, 2, 3], "c": [0.5, 0.9, 1.0]}}}}
    return {v: [entry, entry] for v in order}


def test_variant_colours_agree_across_the_report_plots(tmp_path, monkeypatch):
    """The report lists variants in one order, the measurements in another (alphabetical): every
    figure must still give a variant the same colour, the baseline the first one."""
    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path.name

    monkeypatch.setattr(compare_plots, "_save", keep)
    report = _report(["baseline", "zeta", "alpha"])
    compare_plots.write_plots(report, _measurements(["alpha", "baseline", "zeta"]), tmp_path)
    expected = compare_plots.variant_colors(report)
    assert list(expected) == ["baseline", "zeta", "alpha"]
    bars = figures["metrics.png"].axes[0].patches
    assert [tuple(np.round(b.get_facecolor()[:3], 6)) for b in bars] == \
        [tuple(np.round(expected[v][:3], 6)) for v in ["baseline", "zeta", "alpha"]]
    for name in ("alignment_hist.png", "edge_curves.png"):
        ax = figures[name].axes[0]
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels):
            variant = label.split(" (")[0]
            colour = handle.get_edgecolor() if hasattr(handle, "get_edgecolor") and name.startswith("align") \
                else handle.get_color()
            assert np.allclose(np.asarray(colour)[:3], np.asarray(expected[variant])[:3]), (name, variant)
    # the verdict is part of the variant's tick label, not a text over the data
    ax = figures["metrics.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["baseline", "zeta\n✓", "alpha\n✓"]
    assert not ax.texts


def _graph(n_layers=3, width=60, n_communities=30, seed=0):
    rng = np.random.default_rng(seed)
    G = nx.Graph()
    for l in range(n_layers):
        for i in range(1, width + 1):
            G.add_node(f"{l}:{i}", layer=f"L{l}", layer_index=l, index=i, community=(i - 1) % n_communities)
    for l in range(n_layers - 1):
        for i in range(1, width + 1):
            for j in range(1, width + 1):
                G.add_edge(f"{l}:{i}", f"{l + 1}:{j}", weight=float(rng.exponential()))
    return G


def test_graph_drawing_keeps_every_node_and_says_what_it_leaves_out(tmp_path):
    G = _graph()
    plan = lib_plots.graph_drawing(G, edge_share=0.9, max_edges=300)
    assert len(plan["nodes"]) == 180  # no silent cap (it used to stop at feature 40)
    weights = sorted((w for *_, w in G.edges(data="weight")), reverse=True)
    assert [w for *_, w in plan["edges"]] == weights[:300]  # the strongest, in order
    assert plan["share"] == pytest.approx(sum(weights[:300]) / sum(weights))
    # 30 communities of 6: 9 distinct colours, the other 21 grey; no colour repeats
    coloured = {plan["colours"][n] for n in plan["nodes"]} - {lib_plots.GREY}
    assert len(coloured) == lib_plots.N_COLOURED == len(plan["communities"])
    assert plan["n_communities"] == 30
    small = lib_plots.graph_drawing(G, edge_share=0.5, max_edges=10 ** 6)
    kept = [w for *_, w in small["edges"]]
    assert sum(kept[:-1]) < 0.5 * sum(weights) <= sum(kept)  # the fewest edges reaching 50 %
    assert len(lib_plots.graph_drawing(G, max_rank=10)["nodes"]) == 30


def test_graph_plot_axis_label_and_title(tmp_path, monkeypatch):
    seen = {}

    def keep(fig, path):
        seen["ax"] = fig.axes[0]
        return path

    monkeypatch.setattr(lib_plots, "_save", keep)
    lib_plots.plot_interaction_graph(_graph(), tmp_path / "g.png", title="PCA graph", order="variance")
    ax = seen["ax"]
    assert ax.get_ylabel() == "feature index (sorted by variance, 0 = largest)"
    assert "300 strongest of 7200 edges" in ax.get_title() and "grey: 21 smaller communities" in ax.get_title()
