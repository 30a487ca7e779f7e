"""study/narrow_circuits.py: the quote-closing task's examples and loss, against hand-built cases."""

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from study.narrow_circuits import TASKS  # noqa: E402

quote_examples, quote_loss = TASKS["quote"].examples, TASKS["quote"].loss


def test_quote_examples_are_the_literals_closing_in_the_chosen_windows():
    # window 0: bytes 0-15, window 1: 16-31, window 2: 32-47 (seq_len 16; a window reads one byte more)
    text = b"padding padding x = 'ab' and f(\"cd\") it's don't [\"e\" " + b"." * 16
    close_ab, close_cd, close_e = text.index(b"' and"), text.index(b'") it'), text.index(b'" ')
    got_x, got_y = quote_examples(text, torch.tensor([1, 2]), seq_len=16, context=8)
    # 'ab' closes at 23 (window 1), "cd" at 34 (window 2), "e" at 51 (window 3, not chosen);
    # the apostrophes in it's / don't are not literals (no separator before the opening quote)
    assert (close_ab, close_cd, close_e) == (23, 34, 51)
    assert got_y.tolist() == [0, 1]
    assert [bytes(r) for r in got_x.tolist()] == [text[close_ab - 8:close_ab], text[close_cd - 8:close_cd]]
    # a literal opening before the context is left out: 'ab' and "cd" open 3 bytes before their
    # close, "e" 2 bytes; a literal across a window boundary ("cd" opens in window 1) is kept
    short_x, short_y = quote_examples(text, torch.tensor([1, 2, 3]), seq_len=16, context=3)
    assert short_y.tolist() == [1] and bytes(short_x[0].tolist()) == text[close_e - 3:close_e]
    all_x, all_y = quote_examples(text, torch.tensor([0, 1, 2, 3]), seq_len=16, context=8)
    assert all_y.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="no quote span closes"):
        quote_examples(b"no quotes here at all, none" * 4, torch.tensor([0, 1]), seq_len=16)


def test_quote_loss_is_the_two_way_cross_entropy_at_the_last_position():
    torch.manual_seed(0)
    output = torch.randn(3, 5, 256)
    targets = torch.tensor([0, 1, 1])
    got = quote_loss(output, targets)
    for i, t in enumerate(targets.tolist()):
        single, double = float(output[i, -1, ord("'")]), float(output[i, -1, ord('"')])
        chosen = double if t else single
        expected = -(chosen - math.log(math.exp(single) + math.exp(double)))
        assert float(got[i]) == pytest.approx(expected, rel=1e-5)


def test_bracket_examples_are_the_innermost_brackets_and_their_kind():
    # window 1: bytes 16-31 (targets 17-32), window 2: targets 33-48 (seq_len 16)
    text = b"0123456789abcdef" + b"f(x, [ab]) + g[i" + b"] and (no\nclose)" + b"." * 16
    brackets = TASKS["bracket"]
    got_x, got_y = brackets.examples(text, torch.tensor([1, 2]), seq_len=16, context=6)
    # [ab] closes at 24 (innermost: its enclosing (x, [ab]) is not a match), g[i] at 32, which is
    # window 1's last target
    assert [text[i] for i in (24, 32)] == [ord("]")] * 2
    assert got_y.tolist() == [1, 1]
    assert [bytes(r) for r in got_x.tolist()] == [text[18:24], text[26:32]]
    # with 12 bytes of context (no\nclose) (opens at 38, closes at 47 in window 2) would fit; the
    # newline inside keeps it out
    assert text[38] == ord("(") and text[47] == ord(")")
    assert brackets.examples(text, torch.tensor([1, 2]), seq_len=16, context=12)[1].tolist() == [1, 1]
    assert brackets.examples(text.replace(b"\n", b" "), torch.tensor([1, 2]), seq_len=16, context=12)[1].tolist() == [1, 1, 0]
    wide_x, wide_y = brackets.examples(b"........ (a, b) [c] (d)", torch.tensor([0, 1]), seq_len=16, context=8)
    assert wide_y.tolist() == [0, 1, 0] and bytes(wide_x[0].tolist()) == b".. (a, b"
    output = torch.zeros(2, 3, 256)
    output[0, -1, ord(")")], output[1, -1, ord("]")] = 2.0, 3.0
    assert brackets.loss(output, torch.tensor([0, 1])).tolist() == pytest.approx(
        [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-3.0))])


def test_summary_tests_each_metric_against_the_baseline_with_holm():
    from scipy.stats import ttest_ind

    from study.narrow_circuits import summarise

    def rows(nodes, edges):
        return [{"run": f"r/seed{i}", "examples": 10, "accuracy": 1.0, "loss": 0.01 * (i + 1), "nodes": n,
                 "edges": e, "kept": {"blocks.0.mlp.hook_post": list(range(n))}} for i, (n, e) in enumerate(zip(nodes, edges))]

    base, sparse = rows([40, 44, 42], [900, 1000, 950]), rows([20, 23, 22], [300, 350, 320])
    text = summarise({"baseline": base, "sparse": sparse}, "baseline")
    p_nodes = ttest_ind([20, 23, 22], [40, 44, 42], equal_var=False).pvalue
    p_edges = ttest_ind([300, 350, 320], [900, 1000, 950], equal_var=False).pvalue
    # Holm over 4 tests (accuracy and loss have p = 1): the smallest p times 4, the next times 3
    small, large = sorted([p_nodes, p_edges])
    assert f"p = {small:.2g}, Holm {4 * small:.2g}" in text and f"p = {large:.2g}, Holm {max(3 * large, 4 * small):.2g}" in text
    assert "Holm over 4 comparisons" in text
    assert "| `sparse` | 3 | 10 | ? |" in text  # rows without the model's node count
    assert "| `sparse` | 0.0 | 0.0 |" not in text and "| `sparse` | 21.7 | 21.7 |" in text  # nodes kept per site, mean
    single = summarise({"baseline": base, "sparse": sparse[:1]}, "baseline")
    assert "no test" in single and "Holm over 0 comparisons" in single


def test_report_names_each_cells_dispatch_level_and_warns_when_they_differ():
    """Circuit searches, like training, depend on the CPU dispatch level: the report says which level
    each cell was trained and pruned at, and flags a comparison across levels."""
    from study.narrow_circuits import summarise

    def rows(level):
        return [{"run": f"r/seed{i}", "examples": 10, "accuracy": 1.0, "loss": 0.1, "nodes": 5 + i, "edges": 9 + i,
                 "kept": {"blocks.0.mlp.hook_post": [0]}, **({"dispatch": {"trained": level, "measured": level}}
                                                             if level else {})} for i in range(2)]

    same = summarise({"baseline": rows("AVX2"), "sparse": rows("AVX2")}, "baseline")
    assert "`baseline` AVX2 / AVX2; `sparse` AVX2 / AVX2." in same and "not all trained" not in same
    mixed = summarise({"baseline": rows("AVX512"), "sparse": rows("AVX2")}, "baseline")
    assert "`baseline` AVX512 / AVX512; `sparse` AVX2 / AVX2" in mixed and "not all trained and pruned at one level" in mixed
    within = summarise({"baseline": rows("AVX2")[:1] + rows("AVX512")[1:], "sparse": rows("AVX2")}, "baseline")
    assert "AVX2 / AVX2, AVX512 / AVX512" in within and "not all trained" in within  # a cell mixing levels
    older = summarise({"baseline": rows(None), "sparse": rows("AVX2")}, "baseline")
    assert "`baseline` not recorded / not recorded" in older and "not all trained" not in older
    assert "Levels not recorded in a row" in older and "Levels not recorded" not in same


def test_report_rebuilds_from_saved_rows_with_the_lm_accuracy_of_a_compare_report(tmp_path):
    import json

    from study.narrow_circuits import main

    def row(run, nodes):
        return {"run": str(run), "ablation": "mean", "delta": 0.01, "examples": 10, "accuracy": 1.0, "loss": 0.02,
                "nodes": nodes, "nodes_total": 100, "edges": 10 * nodes, "search_cpu_s": 1.0,
                "kept": {"blocks.0.mlp.hook_post": list(range(nodes))}}

    root = tmp_path / "text_3000"  # no checkpoints: every row comes from runs.jsonl
    runs = {cell: [root / cell / f"seed{k}" for k in range(3)] for cell in ("baseline", "sparse")}
    out = tmp_path / "runs.jsonl"
    out.write_text("".join(json.dumps(row(r, 40 + i)) + "\n" for i, r in enumerate(runs["baseline"]))
                   + "".join(json.dumps(row(r, 20 + i)) + "\n" for i, r in enumerate(runs["sparse"])))
    accuracy = {"baseline": [0.66, 0.65, 0.67], "sparse": [0.60, 0.61, 0.62]}
    compare_report = tmp_path / "report.json"
    compare_report.write_text(json.dumps({"task": "text", "variants": {  # report.json's layout
        cell: {"runs": [str(r) for r in runs[cell]], "seeds": [0, 1, 2],
               "metrics": {"accuracy": {"values": accuracy[cell]}}} for cell in runs}}))
    report = tmp_path / "report.md"
    assert main([str(root), "--cells", "baseline", "sparse", "--seeds", "0", "1", "2", "--out", str(out),
                 "--report", str(report), "--accuracy-from", str(compare_report)]) == 0
    text = report.read_text()
    assert "| LM test accuracy | task accuracy |" in text
    assert "| `baseline` | 3 | 10 | 100 | 0.66 ± 0.01 |" in text and "| `sparse` | 3 | 10 | 100 | 0.61 ± 0.01 (" in text
    assert "Holm over 5 comparisons" in text  # LM accuracy, task accuracy, loss, nodes, edges
    # a saved row is the penalty search's: asking for the Lagrangian search measures again (here:
    # no checkpoint, so every run is left out and no report is written over the old one)
    before = report.read_text()
    main([str(root), "--cells", "baseline", "sparse", "--seeds", "0", "1", "2", "--out", str(out),
          "--report", str(report), "--search", "lagrangian"])
    assert report.read_text() == before and "penalty search;" in before
    # without the compare report the column is left out rather than filled in
    main([str(root), "--cells", "baseline", "sparse", "--seeds", "0", "1", "2", "--out", str(out), "--report", str(report)])
    assert "LM test accuracy" not in report.read_text() and "Holm over 4 comparisons" in report.read_text()


TINY_LM = """
seed_everything: 0
trainer: {max_steps: 2, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false}
model:
  model:
    class_path: interp_train.models.transformer.Transformer
    init_args: {d_vocab: 256, d_vocab_out: 256, n_ctx: 32, d_model: 8, n_heads: 2, d_head: 4, d_mlp: 16,
      n_layers: 1, act_fn: gelu, normalization_type: LN}
data:
  class_path: interp_train.data.text.ByteTextDataModule
  init_args: {source: pydoc, seq_len: 32, max_bytes: 40000, batch_size: 16}
"""


def naive_hoyer(acts: torch.Tensor) -> float:
    """Plain-Python mean over tokens of ||c||_1 / (sqrt(d) ||c||_2), c = token − the mean token."""
    rows = acts.reshape(-1, acts.shape[-1]).double().tolist()
    d = len(rows[0])
    means = [math.fsum(r[j] for r in rows) / len(rows) for j in range(d)]
    total = []
    for r in rows:
        c = [v - m for v, m in zip(r, means)]
        total.append(math.fsum(map(abs, c)) / (math.sqrt(d) * math.sqrt(math.fsum(v * v for v in c))))
    return math.fsum(total) / len(total)


def test_hoyer_measure_is_filled_into_saved_rows_and_reported(tmp_path):
    import json

    from interp_train.cli import main as train_main
    from evaluation.io.checkpoints import load_checkpoint
    from study.narrow_circuits import activation_hoyer, held_out_windows, main

    (tmp_path / "lm.yaml").write_text(TINY_LM)
    root = tmp_path / "text_3000"
    for cell in ("baseline", "other"):
        train_main(["fit", "--config", str(tmp_path / "lm.yaml"), "--run_dir", str(root / cell / "seed0"),
                    "--test_after_fit", "false"])
    sites = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_post"]
    run = root / "baseline" / "seed0"
    measured = activation_hoyer(run, TASKS["bracket"], sites)
    assert list(measured) == [s for s in sites if s != "blocks.0.attn.hook_z"]  # heads are not a feature axis
    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    text, windows = held_out_windows(loaded.datamodule)
    inputs, _ = TASKS["bracket"].examples(text, windows, 32)
    assert len(inputs) > 3
    with torch.no_grad():  # TransformerLens's own cache, not the toolkit's site recorder
        _, cache = loaded.model.eval().model.net.run_with_cache(inputs)
    for site, value in measured.items():
        assert value == pytest.approx(naive_hoyer(cache[site]), rel=1e-5)

    out, report = tmp_path / "runs.jsonl", tmp_path / "report.md"
    saved = {"ablation": "mean", "delta": 0.01, "task": "bracket", "examples": len(inputs), "accuracy": 0.5,
             "loss": 0.7, "nodes": 3, "nodes_total": 50, "edges": 2, "search_cpu_s": 0.0, "kept": {s: [0] for s in sites}}
    gone = tmp_path / "gone" / "seed0"  # a row whose checkpoint is gone keeps what it had
    out.write_text("".join(json.dumps({**saved, "run": str(r)}) + "\n" for r in (run, root / "other" / "seed0", gone)))
    main([str(root), "--task", "bracket", "--cells", "baseline", "other", "--seeds", "0", "--out", str(out),
          "--report", str(report)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in rows] == [str(run), str(root / "other" / "seed0"), str(gone)]
    assert rows[0]["hoyer"] == pytest.approx(measured) and "hoyer" in rows[1] and "hoyer" not in rows[2]
    assert "Activation sparsity on the task's inputs" in report.read_text()
    assert f"| `baseline` | {measured['blocks.0.hook_resid_pre']:.3f} |" in report.read_text()
