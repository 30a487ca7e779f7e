"""Writes the outputs of a LIB fit to a directory, atomically.

Layout of ``out_dir``:
    lib.json              metrics summary (metrics.summarize), config, run metadata, ablation curves
    bases.safetensors     "<lib|pca>/<layer>/<C|C_pinv|Lambda|mean>", "neuron/<layer>/<Lambda|mean>"
                          (the neuron basis is C = C_pinv = I) (float64)
    edges.safetensors     "<lib|pca|neuron>/<input layer>" -> E (k_{l+1}, k_l) (float64)
    graph.graphml         LIB interaction graph (node attributes layer, layer_index, index,
                          community at γ = 1); graph_pca.graphml the same for PCA
    spectra.png, edge_curves.png, graph_lib.png, graph_pca.png, ablation_<layer>.png

Everything is written to a temporary sibling directory ``.<out_dir>.tmp-<pid>-*`` first and
renamed into place at the end, so ``out_dir`` either holds a complete report or is untouched
(nothing is left on error or Ctrl-C; the CLI turns SIGTERM into the same clean-up). A process
killed outright (SIGKILL) cannot clean up: the next report written into the same parent removes
temporary directories whose process no longer runs. The report directory gets the mode any new
directory gets (0777 minus the umask), not mkdtemp's private 0700.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from evaluation.lib import plots
from interp_train.io import current_umask, json_safe
from evaluation.metrics.graph import interaction_graph, modularity, set_communities, write_graphml
from evaluation.metrics.lib_summary import named_edges, summarize


def check_out_dir(out_dir) -> Path:
    """``out_dir`` must not exist or be an empty directory (a report is never overwritten)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {str(out_dir)!r} already exists and is not empty; "
                              "choose a new --out (reports are never overwritten)")
    return out_dir


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Removes ``.<name>.tmp-<pid>-*`` directories in ``parent`` whose process has ended."""
    removed = []
    for path in parent.glob(".*.tmp-*"):
        match = re.search(r"\.tmp-(\d+)-", path.name)
        if not path.is_dir() or match is None or _process_alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def bases_tensors(result) -> dict[str, torch.Tensor]:
    """lib/pca: C, C_pinv, Lambda, mean per layer; neuron (C = C_pinv = I): Lambda and mean only."""
    out = {}
    neuron = getattr(result, "bases", {}).get("neuron", {})
    for side, bases, fields in (("lib", result.lib, ("C", "C_pinv", "Lambda", "mean")),
                                ("pca", result.pca, ("C", "C_pinv", "Lambda", "mean")),
                                ("neuron", neuron, ("Lambda", "mean"))):
        for layer, b in bases.items():
            for field in fields:
                out[f"{side}/{layer}/{field}"] = torch.as_tensor(getattr(b, field)).detach().cpu().clone().contiguous()
    return out


def edges_tensors(result) -> dict[str, torch.Tensor]:
    return {f"{side}/{layer}": torch.as_tensor(E).detach().cpu().clone().contiguous()
            for side, edges in named_edges(result).items() for layer, E in edges.items()}


def _write_all(result, tmp: Path, metadata: Mapping[str, Any], ablation: Mapping[str, Any] | None, seed: int):
    graphs: dict = {}
    summary = summarize(result, seed=seed, graphs=graphs)
    save_file(bases_tensors(result), str(tmp / "bases.safetensors"))
    save_file(edges_tensors(result), str(tmp / "edges.safetensors"))
    files = ["lib.json", "bases.safetensors", "edges.safetensors"]
    if len(result.node_layers) >= 3:
        for side, edges, graph_file in (("lib", result.lib_edges, "graph.graphml"),
                                        ("pca", result.pca_edges, "graph_pca.graphml")):
            if side in graphs:  # built and partitioned by summarize, same edges, γ and seed
                G, communities = graphs[side]
            else:
                G = interaction_graph(edges, result.node_layers)
                _, communities = modularity(G, resolution=1.0, seed=seed)
            set_communities(G, communities)
            write_graphml(G, tmp / graph_file)
            plots.plot_interaction_graph(G, tmp / f"graph_{side}.png", order="Λ" if side == "lib" else "variance",
                                         title=f"{side.upper()} interaction graph (Louvain communities, γ = 1)")
            files += [graph_file, f"graph_{side}.png"]
    plots.plot_spectra(result, tmp / "spectra.png")
    plots.plot_edge_curves(result, tmp / "edge_curves.png")
    files += ["spectra.png", "edge_curves.png"]
    for layer, curves in (ablation or {}).items():
        name = f"ablation_{layer.replace('/', '_')}.png"
        metric = curves.get("metric", "accuracy")
        plots.plot_ablation({b: (curves["ks"][b], curves[b]) for b in ("lib", "pca") if b in curves},
                            tmp / name, layer, metric)
        files.append(name)
    config = dataclasses.asdict(result.config) if dataclasses.is_dataclass(result.config) else result.config
    report = {"metadata": dict(metadata), "config": config, "methods": dict(getattr(result, "methods", {})),
              "summary": summary,
              "ablation": dict(ablation or {}), "files": files}
    (tmp / "lib.json").write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    return report


def write_lib_report(result, out_dir, metadata: Mapping[str, Any] | None = None,
                     ablation: Mapping[str, Any] | None = None, seed: int = 0) -> dict:
    """Writes the report of ``result`` to ``out_dir`` (see the module docstring); returns lib.json's content.

    ablation: {layer: {"metric": ..., "ks": {"lib": [...], "pca": [...]}, "lib": [...], "pca": [...]}}.
    """
    out_dir = check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        report = _write_all(result, tmp, metadata or {}, ablation, seed)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
