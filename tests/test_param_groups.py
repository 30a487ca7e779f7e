"""interp_train.param_groups: optimizer groups from the no_weight_decay / lr_scale flags."""

import pytest
import torch

from interp_train.param_groups import param_groups


def _param(n, **flags):
    p = torch.nn.Parameter(torch.zeros(n))
    for k, v in flags.items():
        setattr(p, k, v)
    return p


def test_groups_follow_the_flags_and_list_each_parameter_once():
    plain, plain2 = _param(1), _param(2)
    gate, gate2 = _param(3, no_weight_decay=True, lr_scale=10.0), _param(4, no_weight_decay=True, lr_scale=10.0)
    undecayed = _param(5, no_weight_decay=True)
    groups = param_groups([plain, gate, plain2, undecayed, gate2, plain], lr=0.1, weight_decay=0.5)
    got = [([p.numel() for p in g["params"]], g["weight_decay"], g["lr"]) for g in groups]
    assert got == [([1, 2], 0.5, 0.1), ([3, 4], 0.0, pytest.approx(1.0)), ([5], 0.0, 0.1)]
    opt = torch.optim.AdamW(groups, lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, pytest.approx(1.0), 0.1]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "10"])
def test_a_bad_lr_scale_is_named(bad):
    with pytest.raises(ValueError, match=r"shape \(2,\) has lr_scale .* allowed: a finite number > 0"):
        param_groups([_param(2, lr_scale=bad)], lr=0.1, weight_decay=0.0)
