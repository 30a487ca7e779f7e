"""study/cpu_dispatch.py and run_study's refusal to mix runs trained with different torch CPU
capabilities: read from the provenance.json that interp_train writes, checked before training
and before reporting."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from study import run_study  # noqa: E402
from study import cpu_dispatch  # noqa: E402
from study.cpu_dispatch import check_one_capability, mixed_capabilities, trained_capability  # noqa: E402
from study.sweep import run_dir  # noqa: E402


def trained_run(root: Path, task: str, variant: str, seed: int, capability: str | None) -> Path:
    """A run directory that counts as trained, its provenance naming ``capability`` (none if None)."""
    directory = run_dir(root, task, variant, seed)
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text("{}")
    if capability is not None:  # a start and a resume: the last entry is the one that counts
        (directory / "provenance.json").write_text(json.dumps(
            [{"torch_cpu_capability": "DEFAULT"}, {"torch_cpu_capability": capability}]))
    return directory


def test_the_capability_interp_train_records_is_the_one_read(tmp_path):
    from interp_train.provenance import record_fit

    record_fit(tmp_path, resumed_from_step=None)
    assert trained_capability(tmp_path) == cpu_dispatch.current_level()
    assert trained_capability(tmp_path).split("+")[0] == torch.backends.cpu.get_cpu_capability()


def test_a_lowered_torch_level_with_onednn_left_high_is_its_own_level(tmp_path, monkeypatch):
    """ATEN_CPU_CAPABILITY alone lowers torch's kernels, not oneDNN's: that is neither machine's level."""
    from interp_train import provenance

    def level(torch_level, onednn):
        return provenance.dispatch_level({"torch_cpu_capability": torch_level, "onednn_level": onednn})

    assert level("AVX2", "AVX2") == "AVX2" and level("AVX512", "AVX512_CORE") == "AVX512"
    assert level("AVX2", "AVX512_CORE") == "AVX2+oneDNN:AVX512_CORE"
    assert level("AVX2", None) == "AVX2"  # recorded before oneDNN's level was
    assert provenance.dispatch_level({}) is None
    cpu = provenance.onednn_level()
    if cpu in (None, "SSE41"):
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert provenance.onednn_level() == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")  # above the CPU's: the CPU's
    assert provenance.onednn_level() == cpu
    two = [trained_run(tmp_path, "t", "baseline", s, "AVX2") for s in (0, 1)]
    entries = json.loads((two[1] / "provenance.json").read_text())
    entries[-1]["onednn_level"] = "AVX512_CORE"
    (two[1] / "provenance.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="AVX2\\+oneDNN:AVX512_CORE"):
        check_one_capability("t", two, "AVX2", training=False)


def test_unrecorded_or_unreadable_provenance_has_no_capability(tmp_path):
    assert trained_capability(tmp_path) is None
    (tmp_path / "provenance.json").write_text("not json")
    assert trained_capability(tmp_path) is None
    (tmp_path / "provenance.json").write_text("[]")
    assert trained_capability(tmp_path) is None


def test_runs_are_grouped_by_their_last_entry(tmp_path):
    a = trained_run(tmp_path, "t", "baseline", 0, "AVX2")
    b = trained_run(tmp_path, "t", "baseline", 1, "AVX512")
    c = trained_run(tmp_path, "t", "baseline", 2, None)
    assert mixed_capabilities([a, b, c]) == {"AVX2": [a], "AVX512": [b]}


def test_check_refuses_mixed_runs_and_new_runs_of_another_capability(tmp_path):
    avx2 = [trained_run(tmp_path, "t", "baseline", s, "AVX2") for s in (0, 1)]
    check_one_capability("t", avx2, "AVX2", training=True)  # same capability: fine
    check_one_capability("t", avx2, "AVX512", training=False)  # measuring them elsewhere: one group, fine
    with pytest.raises(ValueError, match="ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2") as err:
        check_one_capability("t", avx2, "AVX512", training=True)
    assert "AVX512" in str(err.value) and str(avx2[0]) in str(err.value)
    with pytest.raises(ValueError, match="this CPU cannot reach AVX2"):  # a lower level cannot be raised
        check_one_capability("t", avx2, "DEFAULT", training=True)
    mixed = avx2 + [trained_run(tmp_path, "t", "baseline", 2, "AVX512")]
    with pytest.raises(ValueError, match="different CPU capabilities"):
        check_one_capability("t", mixed, "AVX2", training=False)


def test_run_study_refuses_to_train_beside_runs_of_another_capability(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_dispatch, "current_level", lambda: "AVX512")
    trained = []
    monkeypatch.setattr(run_study, "train", lambda plan, todo, *a, **k: trained.append(todo) or [])
    old = trained_run(tmp_path, "modular_addition", "baseline", 0, "AVX2")
    args = ["--tasks", "modular_addition", "--families", "baseline", "--seeds", "0", "1", "--root", str(tmp_path),
            "--train-only"]
    with pytest.raises(SystemExit, match="ATEN_CPU_CAPABILITY=avx2") as err:
        run_study.main(args)
    assert str(old) in str(err.value) and not trained
    run_study.main([*args, "--allow-mixed-cpu"])
    assert len(trained) == 1


def test_run_study_refuses_to_report_runs_that_mix_capabilities(tmp_path, monkeypatch):
    import evaluation.compare

    class Measured(Exception):
        pass

    def fake_run_compare(*args, **kwargs):
        raise Measured

    monkeypatch.setattr(evaluation.compare, "run_compare", fake_run_compare)
    monkeypatch.setattr(evaluation.compare, "runs_from_paths", lambda variant, paths: list(paths))
    monkeypatch.setattr(run_study, "other_architectures", lambda variants, baseline: [])  # the fake runs have no config
    monkeypatch.setattr(cpu_dispatch, "current_level", lambda: "AVX512")
    trained_run(tmp_path, "text", "baseline", 0, "AVX2")
    args = ["--tasks", "text", "--seeds", "0", "1", "--root", str(tmp_path), "--out", str(tmp_path / "out"),
            "--compare-only"]
    with pytest.raises(Measured):  # one capability, measured on another machine: allowed
        run_study.main(args)
    trained_run(tmp_path, "text", "baseline", 1, "AVX512")
    with pytest.raises(SystemExit, match="different CPU capabilities"):
        run_study.main(args)
    with pytest.raises(Measured):
        run_study.main([*args, "--allow-mixed-cpu"])


def test_resuming_at_another_capability_warns_and_at_the_same_does_not(tmp_path, recwarn):
    from interp_train.provenance import record_fit

    current = torch.backends.cpu.get_cpu_capability()
    other = "AVX2" if current != "AVX2" else "AVX512"
    (tmp_path / "provenance.json").write_text(json.dumps([{"torch_cpu_capability": other, "resumed_from_step": None}]))
    with pytest.warns(UserWarning, match=f"started with torch CPU capability {other} and is resumed with {current}"):
        entries = record_fit(tmp_path, resumed_from_step=30)
    assert [e["torch_cpu_capability"] for e in entries] == [other, current]
    record_fit(tmp_path, resumed_from_step=60)  # earlier entries still name the other level: warns again
    assert any("ONEDNN_MAX_CPU_ISA" in str(w.message) for w in recwarn.list)
    recwarn.clear()
    record_fit(tmp_path, resumed_from_step=None)  # a fresh start over the old directory: nothing to compare
    record_fit(tmp_path, resumed_from_step=90)  # resumed at the same level as it started
    assert not [w for w in recwarn.list if "CPU capability" in str(w.message)]


def test_provenance_records_the_variables_that_select_kernels(tmp_path, monkeypatch):
    from interp_train.provenance import record_fit

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    (entry,) = record_fit(tmp_path, resumed_from_step=None)
    assert entry["numerics_environment"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and "MKL_CBWR" not in entry["numerics_environment"]


def test_resuming_with_onednn_at_another_level_warns(tmp_path, recwarn):
    from interp_train.provenance import environment, record_fit

    here = environment()
    if not here.get("onednn_level"):
        pytest.skip("oneDNN's level is not known on this CPU")
    other = "SSE41" if here["onednn_level"] != "SSE41" else "AVX2"
    (tmp_path / "provenance.json").write_text(json.dumps(
        [{"torch_cpu_capability": here["torch_cpu_capability"], "onednn_level": other}]))
    with pytest.warns(UserWarning, match=f"oneDNN:{other}"):
        record_fit(tmp_path, resumed_from_step=10)


def test_an_entry_from_before_onednn_was_recorded_is_compared_on_torch_alone(tmp_path, recwarn):
    """provenance.json files written before oneDNN's level was recorded name torch's only: resuming such
    a run at the same torch level is not a change (the same rule study/cpu_dispatch.py groups runs by)."""
    from interp_train.provenance import environment, record_fit

    here = environment()
    (tmp_path / "provenance.json").write_text(json.dumps([{"torch_cpu_capability": here["torch_cpu_capability"]}]))
    record_fit(tmp_path, resumed_from_step=10)
    assert not [w for w in recwarn.list if "CPU capability" in str(w.message)]
    assert trained_capability(tmp_path) == cpu_dispatch.current_level()
