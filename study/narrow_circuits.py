"""Pruned circuits of a narrow task inside the byte LM (issue 15): Gao et al.'s 16x is for narrow
tasks inside a general language model, while the study's circuit metric prunes for next-byte
prediction at every position, which uses the whole model. This measures the same pruning search
(``evaluation.metrics.circuit.prune_circuit``: node gates, mean ablation by default or zero
ablation, δ = 0.01 nats) on two tasks of their kind (``--task``):

* ``quote`` (default), closing a string literal with the quote that opened it. Examples: every
  string literal of the form ``<sep>'abc'`` or ``<sep>"abc"`` — ``<sep>`` one of ``( [ = , : {
  space``, contents 1–30 bytes of ``[A-Za-z0-9_./ -]`` — whose closing quote is a target of a
  held-out window (validation and test splits of the recipe's data, never trained on)
  and whose opening quote lies within the 24 bytes before it. Input: those 24 bytes; the logits
  are read at the last position.
* ``bracket``, closing a bracket with its own kind: every innermost ``(…)`` or ``[…]`` (1–30 bytes,
  no bracket or newline inside) closing in a held-out window and opening within the 24 bytes
  before the closing bracket — function signatures, grammar rules and calls of the documentation.
* Task loss: binary cross-entropy between the two answer bytes (the logits of ``'`` and ``"``, or
  ``)`` and ``]``, only), as in Gao et al.'s tasks; task accuracy: the right one scores higher.

Per run: the LM's own next-byte test accuracy (the regularizer's cost, as ``interp-eval compare``
measures it), the task's accuracy and loss, the circuit's nodes and edges, and the activations'
centred Hoyer measure at each residual/MLP site on the task's inputs (what ActivationSparsity trains
down; filled into saved rows whose checkpoint is present; reported, not tested), and the CPU dispatch
level the run was trained and pruned at (the report flags cells of different levels). Per cell: mean ± std
over seeds; cells against the baseline by Welch's t-test, Holm over the comparisons made. Rows of
``--out`` are reused without their checkpoints, so a report can be rebuilt after the runs are gone.

    python study/narrow_circuits.py ROOT/text_3000 [--task bracket] [--cells baseline weight_sparsity_d0.5_x1] [--ablation zero]
        [--out runs.jsonl] [--report report.md] [--accuracy-from study/results/text_3000/report.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONTEXT = 24  # bytes of input before the closing byte; the span opens inside them


@dataclass(frozen=True)
class NarrowTask:
    """A two-way choice of the byte that closes a span opened within the context: each match of
    ``pattern`` runs from the opening byte to the closing one, which is one of ``answers`` (target
    0 or 1). The logits are read at the last input position; the loss is the cross-entropy between
    the two answers' logits only, as in Gao et al.'s tasks."""

    name: str
    title: str
    pattern: re.Pattern
    answers: tuple[int, int]

    def examples(self, data: bytes, windows: torch.Tensor, seq_len: int, context: int = CONTEXT
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (M, context), targets (M,)) for every match in the text ``data`` whose closing
        byte is a target of one of ``windows`` (indices of its seq_len-byte windows: window w
        predicts bytes w·seq_len + 1 … (w + 1)·seq_len) and whose opening byte lies within the
        ``context`` bytes before it. The input is those bytes."""
        chosen = set(windows.tolist())
        inputs, targets = [], []
        for match in self.pattern.finditer(data):
            close = match.end() - 1
            if (close - 1) // seq_len in chosen and close - match.start() < context <= close:
                inputs.append(list(data[close - context:close]))
                targets.append(int(data[close] == self.answers[1]))
        if not inputs:
            raise ValueError(f"no {self.name} span closes inside these windows; the {self.name} task needs "
                             f"text with {bytes(self.answers).decode()}")
        return torch.tensor(inputs), torch.tensor(targets)

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """(M, 2): the two answers' logits at the last position."""
        return output[:, -1][:, list(self.answers)]

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-example two-way cross-entropy, (M,)."""
        return torch.nn.functional.cross_entropy(self.logits(output), targets, reduction="none")


TASKS = {task.name: task for task in (
    # <sep>'abc' or <sep>"abc": the quote after a separator, contents 1-30 identifier-like bytes
    NarrowTask("quote", "closing a string literal with its own quote",
               re.compile(rb"(?<=[(\[=,:{ ])(['\"])([A-Za-z0-9_./ -]{1,30}?)\1"), (ord("'"), ord('"'))),
    # (abc) or [abc]: innermost brackets (no bracket or newline inside), 1-30 bytes
    NarrowTask("bracket", "closing a bracket with its own kind",
               re.compile(rb"\(([^()\[\]\n]{1,30})\)|\[([^()\[\]\n]{1,30})\]"), (ord(")"), ord("]"))),
)}


def held_out_windows(datamodule) -> tuple[bytes, torch.Tensor]:
    """(the recipe's text, indices of its validation and test windows): the data module's own split."""
    from interp_train.data.text import byte_windows

    data = datamodule.text_bytes()
    splits = datamodule.window_splits(len(byte_windows(data, datamodule.seq_len)))
    return data, torch.cat([splits["val"], splits["test"]])


def next_byte_accuracy(model, datamodule) -> float:
    """The LM's own held-out accuracy, as ``interp-eval compare`` measures it: every predicted byte
    of the whole test split (the cost of a regularizer, beside the circuit it buys)."""
    from evaluation.compare.data import batches, split_tensors
    from evaluation.metrics.robustness import evaluate_accuracy

    datamodule.setup("fit")
    return evaluate_accuracy(model, batches(split_tensors(datamodule, "test"), 256), progress=False)["accuracy"]


def accuracies_from_report(path: Path) -> dict[str, float]:
    """{run directory: accuracy} from an ``interp-eval compare`` / run_study report.json, for rows
    measured before this script recorded the LM's accuracy (the same metric on the same runs)."""
    from study.restat import measurements_from_report

    runs = measurements_from_report(json.loads(path.read_text()))
    return {run["run_dir"]: run["metrics"]["accuracy"] for rows in runs.values() for run in rows}


def measure_run(run: Path, delta: float, ablation: str = "mean", task: NarrowTask = TASKS["quote"],
                search: str = "penalty") -> dict:
    from evaluation.io.checkpoints import load_checkpoint
    from evaluation.metrics.circuit import CircuitConfig, prune_circuit
    from interp_train.sites import run_model
    from study.cpu_dispatch import current_level, trained_capability

    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    model = loaded.model.eval()
    text, windows = held_out_windows(loaded.datamodule)
    inputs, targets = task.examples(text, windows, loaded.datamodule.seq_len)
    with torch.no_grad():
        logits = task.logits(run_model(model, inputs).output)
    start = time.process_time()
    circuit = prune_circuit(model, inputs, targets, CircuitConfig(delta=delta, ablation=ablation, search=search),
                            loss_fn=task.loss)
    return {"run": str(run), "task": task.name, "ablation": ablation, "delta": delta, "search": search,
            "examples": len(targets),
            "second_answer_share": float(targets.float().mean()),
            "accuracy": float((logits.argmax(1) == targets).float().mean()),
            "loss": circuit.full_loss, "nodes": circuit.nodes_kept, "nodes_total": circuit.nodes_total,
            "edges": circuit.edges, "edges_total": circuit.edges_total, "circuit_loss": circuit.loss,
            "kept": circuit.kept, "search_cpu_s": time.process_time() - start,
            "lm_accuracy": next_byte_accuracy(model, loaded.datamodule),
            "hoyer": site_hoyer(model, inputs, circuit.kept),
            # the search's keep/drop decisions, like training, depend on the CPU dispatch level
            "dispatch": {"trained": trained_capability(run), "measured": current_level()}}


def dispatch_note(results: dict[str, list[dict]]) -> str:
    """Which CPU dispatch level each cell was trained and pruned at (study/cpu_dispatch.py), and a
    warning when the cells differ: a comparison across levels measures the levels too."""
    unknown = "not recorded"
    pairs = {cell: sorted({(r.get("dispatch", {}).get("trained") or unknown, r.get("dispatch", {}).get("measured") or unknown)
                           for r in rows}) for cell, rows in results.items()}
    text = "CPU dispatch level, trained / pruned: " + "; ".join(
        f"`{cell}` " + ", ".join(f"{t} / {m}" for t, m in cell_pairs) for cell, cell_pairs in pairs.items()) + "."
    # more than one recorded level for training, or for pruning, among the compared rows
    if any(len({pair[side] for cell_pairs in pairs.values() for pair in cell_pairs} - {unknown}) > 1 for side in (0, 1)):
        text += " **The cells were not all trained and pruned at one level** (study/README.md, \"Reproducing runs\")."
    if any(unknown in pair for cell_pairs in pairs.values() for pair in cell_pairs):
        # rows measured before 2026-12-06; which machine made them is known from the study's log
        text += " Levels not recorded in a row: study/README.md, \"Reproducing runs\", lists them by date."
    return text


def site_hoyer(model, inputs: torch.Tensor, sites) -> dict[str, float]:
    """{site: centred Hoyer measure} of the model's activations on ``inputs`` (every position), at
    each residual-stream and MLP site among ``sites`` (``regularizers.activation_sparsity``: the
    quantity ActivationSparsity trains down, 1/√d one channel per token … ≈ 0.80 dense Gaussian)."""
    from interp_train.regularizers.activation_sparsity import ActivationSparsity
    from interp_train.sites import run_model

    sites = [s for s in sites if "resid" in s or s.endswith("mlp.hook_post")]
    probe = ActivationSparsity(layers=sites)
    with torch.no_grad():
        acts = run_model(model, inputs, record=sites).activations
    return {site: float(probe.measure(acts[site])) for site in sites}


def activation_hoyer(run: Path, task: NarrowTask, sites) -> dict[str, float]:
    """``site_hoyer`` of a saved run on the task's inputs (for rows measured before it was recorded)."""
    from evaluation.io.checkpoints import load_checkpoint

    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    text, windows = held_out_windows(loaded.datamodule)
    inputs, _ = task.examples(text, windows, loaded.datamodule.seq_len)
    return site_hoyer(loaded.model.eval(), inputs, sites)


def summarise(results: dict[str, list[dict]], baseline: str) -> str:
    from evaluation.compare.stats import apply_correction, compare_groups

    metrics = {"accuracy": True, "loss": False, "nodes": False, "edges": False}  # higher is better?
    if all("lm_accuracy" in r for rows in results.values() for r in rows):
        metrics = {"lm_accuracy": True, **metrics}
    tests = {(cell, m): compare_groups([r[m] for r in results[baseline]], [r[m] for r in results[cell]], better)
             for cell in results if cell != baseline for m, better in metrics.items()}
    n_tested = apply_correction(list(tests.values()), "holm")
    labels = {"lm_accuracy": "LM test accuracy", "accuracy": "task accuracy", "loss": "task loss",
              "nodes": "circuit nodes", "edges": "circuit edges"}
    # the model's node count beside the circuit's: cells may differ in width (Gao et al. compare a
    # wider sparse model's circuit against a dense model's at equal loss, in absolute nodes)
    lines = [f"| cell | seeds | examples | model nodes | {' | '.join(labels[m] for m in metrics)} |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for cell, rows in results.items():
        cols = []
        for m in metrics:
            values = [r[m] for r in rows]
            text = f"{statistics.mean(values):.4g} ± {statistics.stdev(values) if len(values) > 1 else 0:.2g}"
            if cell != baseline:
                test = tests[(cell, m)]
                text += f" (base/cell {test['mean_baseline'] / test['mean_variant']:.2f}×"
                text += (f", p = {test['p']:.2g}, Holm {test['p_adjusted']:.2g})" if test["p"] is not None
                         else ", no test)")
            cols.append(text)
        model_nodes = "/".join(sorted({str(r["nodes_total"]) for r in rows if "nodes_total" in r})) or "?"
        lines.append(f"| `{cell}` | {len(rows)} | {rows[0]['examples']} | {model_nodes} | {' | '.join(cols)} |")
    lines.append(f"\nHolm over {n_tested} comparisons (Welch's t-test). {dispatch_note(results)}")
    return "\n".join(lines) + "\n\n" + composition_table(results) + hoyer_table(results)


def hoyer_table(results: dict[str, list[dict]]) -> str:
    """Mean over seeds of each site's centred Hoyer measure (not a tested comparison: it shows
    whether an activation penalty did what it trains for); '' unless every row has it."""
    from study.circuit_composition import short_site, site_order

    if not all("hoyer" in r for rows in results.values() for r in rows):
        return ""
    sites = sorted({site for rows in results.values() for r in rows for site in r["hoyer"]}, key=site_order)
    lines = ["\n\nActivation sparsity on the task's inputs, centred ||c||_1 / (sqrt(d) ||c||_2) per token "
             "(1/sqrt(d): one channel, ~0.80: dense Gaussian), mean over seeds:\n",
             f"| cell | {' | '.join(short_site(s) for s in sites)} |", "|---|" + "---|" * len(sites)]
    for cell, rows in results.items():
        means = [statistics.mean(r["hoyer"][s] for r in rows) for s in sites]
        lines.append(f"| `{cell}` | {' | '.join(f'{m:.3f}' for m in means)} |")
    return "\n".join(lines)


def composition_table(results: dict[str, list[dict]]) -> str:
    """Nodes kept per site (mean over seeds), as study/circuit_composition.py prints the study's circuits."""
    from study.circuit_composition import short_site, site_order

    sites = sorted({site for rows in results.values() for r in rows for site in r["kept"]}, key=site_order)
    lines = [f"| cell | {' | '.join(short_site(s) for s in sites)} | all |", "|---|" + "---|" * (len(sites) + 1)]
    for cell, rows in results.items():
        cols = [f"{statistics.mean(len(r['kept'].get(s, [])) for r in rows):.1f}" for s in sites]
        lines.append(f"| `{cell}` | {' | '.join(cols)} | {statistics.mean(r['nodes'] for r in rows):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from evaluation.metrics.circuit import ABLATIONS, SEARCHES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_root", type=Path, help="ROOT/<task> holding <cell>/seed<k>/checkpoints/last.ckpt")
    parser.add_argument("--cells", nargs="+", default=["baseline", "weight_sparsity_d0.5_x1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--task", choices=list(TASKS), default="quote")
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--ablation", choices=ABLATIONS, default="mean")
    parser.add_argument("--search", choices=SEARCHES, default="penalty",
                        help="the circuit search (evaluation/metrics/circuit.py; penalty: every committed row)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON lines, one per run; runs already there are not measured again")
    parser.add_argument("--report", type=Path, help="write the tables (markdown, with the command and date) here")
    parser.add_argument("--accuracy-from", type=Path, metavar="REPORT_JSON",
                        help="the LM's test accuracy of rows measured without it, from a compare report of the same runs")
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    known_accuracy = accuracies_from_report(args.accuracy_from) if args.accuracy_from else {}
    torch.set_num_threads(args.threads)
    done = {}
    if args.out and args.out.is_file():
        for row in map(json.loads, filter(None, args.out.read_text().splitlines())):
            key = (row["run"], row.get("task", "quote"), row.get("ablation", "mean"), row.get("delta", 0.01),
                   row.get("search", "penalty"))  # rows written before the option existed: the penalty search
            done[key] = row
    results: dict[str, list[dict]] = {}
    filled = False  # a saved row without the Hoyer measure was given it (the file is rewritten)
    new_rows: list[dict] = []
    for cell in args.cells:
        for seed in args.seeds:
            run = args.task_root / cell / f"seed{seed}"
            row = done.get((str(run), task.name, args.ablation, args.delta, args.search))
            if row is None and not (run / "checkpoints" / "last.ckpt").is_file():
                print(f"{run}: no checkpoint, left out", file=sys.stderr)
                continue
            if row is None:
                row = measure_run(run, args.delta, args.ablation, task, args.search)
                new_rows.append(row)
                if args.out:
                    with args.out.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            elif "hoyer" not in row and (run / "checkpoints" / "last.ckpt").is_file():
                row["hoyer"] = activation_hoyer(run, task, row["kept"])  # updates the saved row too
                filled = True
            print(f"{cell} seed{seed}: {row['examples']} examples, accuracy {row['accuracy']:.3f}, loss "
                  f"{row['loss']:.3f}, circuit {row['nodes']}/{row['nodes_total']} nodes, {row['edges']} edges "
                  f"({row['search_cpu_s']:.0f} s CPU)", flush=True)
            if "lm_accuracy" not in row and str(run) in known_accuracy:
                row = {**row, "lm_accuracy": known_accuracy[str(run)]}
            results.setdefault(cell, []).append(row)
    if filled and args.out:
        from interp_train.io import write_atomic

        write_atomic(args.out, "".join(json.dumps(r) + "\n" for r in [*done.values(), *new_rows]))
    if args.cells[0] in results and len(results) > 1:
        tables = summarise(results, args.cells[0])
        print(tables)
        if args.report:
            from interp_train.io import write_atomic

            command = "python study/narrow_circuits.py " + shlex.join(sys.argv[1:] if argv is None else argv)
            seeds = {cell: [Path(r["run"]).name for r in rows] for cell, rows in results.items()}
            write_atomic(args.report, f"# Narrow-task circuits: {task.title}\n\n"
                         f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; runs {seeds}).\n"
                         f"Pruning: {args.ablation} ablation, δ = {args.delta} nats on the two-way cross-entropy, "
                         f"{args.search} search; "
                         f"mean ± std over seeds (ddof 1); study/narrow_circuits.py's docstring has the task.\n\n"
                         f"{tables}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
