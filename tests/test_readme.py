"""The README's Python examples run as written (they are what users copy first)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
    if "regularized_loss" in BLOCKS[index]:
        out = namespace["out"]
        assert set(out.logs()) >= {"task_loss", "loss", "finite_difference_gradient_norm/fd_grad_norm_sq",
                                   "activation_degeneracy/erank/1"}
        assert out.logs()["loss"] == pytest.approx(
            out.logs()["task_loss"] + sum(v for k, v in out.logs().items() if k.endswith("_weighted")), rel=1e-5)
    if "attach_regularizers" in BLOCKS[index]:
        assert namespace["model"].regularizers[0].step == 5
