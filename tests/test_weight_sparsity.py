"""WeightSparsity / WeightL1: top-k against a sorted-magnitude reference, the anneal schedule, resume,
Lightning and plain loops, parameter selection, bad input."""

import pytest
import torch
from torch import nn

from interp_train import after_optimizer_step, attach_regularizers, regularized_loss
from interp_train.regularizers.weight_sparsity import (
    WeightL1, WeightSparsity, keep_top_k_, kept_count, select_parameters,
)
from interp_train.schedules import Constant
from tests.helpers import PlainClassifier, quiet_trainer, toy_loader


def naive_top_k_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: sort all |w| in Python, keep positions of the k largest."""
    values = [abs(v) for v in w.flatten().tolist()]
    order = sorted(range(len(values)), key=lambda i: -values[i])
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(w)


@pytest.mark.parametrize("k", [1, 7, 30, 48])
def test_kept_entries_are_the_sorted_magnitude_top_k(k):
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(k))  # distinct magnitudes (no ties)
    expected = torch.where(naive_top_k_mask(w, k), w, torch.zeros_like(w))
    out = keep_top_k_(w.clone(), k)
    assert torch.equal(out, expected)
    assert int((out != 0).sum()) == k


def test_top_k_on_a_non_contiguous_tensor():
    base = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    w = base.t()  # a view, not contiguous
    expected = torch.where(naive_top_k_mask(w, 10), w, torch.zeros_like(w))
    keep_top_k_(w, 10)
    assert torch.equal(w, expected) and torch.equal(base.t(), expected)


def test_density_anneals_linearly_then_stays_at_target():
    reg = WeightSparsity(density=0.2, anneal_steps=10)
    assert [reg.density(t) for t in (0, 5, 10, 50)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert kept_count(100, 0.2) == 20 and kept_count(3, 0.01) == 1 and kept_count(7, 1.0) == 7


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))


def plain_loop(model, regs, steps, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randint(0, 10, (16, 2), generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        regularized_loss(model, x, y, regs).total.backward()
        opt.step()
        after_optimizer_step(model, regs)


def test_plain_loop_reaches_target_density_and_leaves_embeddings_and_biases_dense():
    model = mlp()
    reg = WeightSparsity(density=0.25, anneal_steps=4)
    plain_loop(model, [reg], steps=6)
    for name in ("2.weight", "4.weight"):
        w = dict(model.named_parameters())[name]
        assert int((w != 0).sum()) == kept_count(w.numel(), 0.25)
    assert bool((model[0].weight != 0).all()) and bool((model[2].bias != 0).all())
    assert reg.optimizer_steps == 6


def test_midway_density_after_each_step():
    model = mlp()
    reg = WeightSparsity(density=0.1, anneal_steps=10, params=["2.weight"])
    plain_loop(model, [reg], steps=3)
    assert int((model[2].weight != 0).sum()) == kept_count(16 * 12, 1 + (0.1 - 1) * 3 / 10)
    assert bool((model[4].weight != 0).all())  # not selected


def test_embeddings_are_opt_in():
    model = mlp()
    assert "0.weight" not in select_parameters(model)
    assert "0.weight" in select_parameters(model, include_embeddings=True)
    with pytest.raises(ValueError, match=r"'0\.\*' matches no weight tensor.*include_embeddings=True.*2\.weight"):
        select_parameters(model, ["0.*"])


def test_state_dict_resume_restores_k():
    model = mlp()
    reg = WeightSparsity(density=0.1, anneal_steps=10)
    plain_loop(model, [reg], steps=4)
    fresh = WeightSparsity(density=0.1, anneal_steps=10)
    fresh.load_state_dict(reg.state_dict())
    assert fresh.optimizer_steps == 4 and fresh.density() == pytest.approx(1 + (0.1 - 1) * 0.4)
    plain_loop(model, [fresh], steps=1, seed=1)
    assert int((model[2].weight != 0).sum()) == kept_count(16 * 12, 1 + (0.1 - 1) * 0.5)


def test_lightning_default_anneals_over_half_of_max_steps_and_resumes(tmp_path):
    module = attach_regularizers(PlainClassifier(), [WeightSparsity(density=0.25)])
    trainer = quiet_trainer(max_steps=8, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, toy_loader(batch_size=8))
    reg = module.regularizers[0]
    assert reg.anneal_steps == 4 and reg.optimizer_steps == 8
    for lin in (module.net[0], module.net[2]):
        assert int((lin.weight != 0).sum()) == kept_count(lin.weight.numel(), 0.25)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = attach_regularizers(PlainClassifier(), [WeightSparsity(density=0.25)])
    quiet_trainer(max_steps=20).fit(resumed, toy_loader(batch_size=8), ckpt_path=ckpt)
    # the anneal length saved at max_steps=8 survives a resume with a longer run
    assert resumed.regularizers[0].anneal_steps == 4 and resumed.regularizers[0].optimizer_steps == 20


def test_schedule_as_density():
    reg = WeightSparsity(density=Constant(0.5))
    assert reg.density(0) == 0.5


def test_weight_l1_term_is_mean_absolute_weight():
    model = mlp()
    weights = [model[2].weight, model[4].weight]
    n = sum(w.numel() for w in weights)
    expected = sum(float(w.detach().abs().sum()) for w in weights) / n
    out = regularized_loss(model, torch.randint(0, 10, (4, 2)), torch.zeros(4, dtype=torch.long), [WeightL1(weight=1.0)])
    term = out.terms["weight_l1/l1"]
    assert term.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(term, [model[2].weight])
    assert torch.allclose(grad, model[2].weight.detach().sign() / n)  # d/dW mean|W| = sign(W) / N


def test_weight_l1_lowers_the_l1_norm():
    def l1_after(weight):
        model = mlp(3)
        plain_loop(model, [WeightL1(weight=weight)], steps=30)
        return float(model[2].weight.abs().sum() + model[4].weight.abs().sum())

    assert l1_after(100.0) < 0.8 * l1_after(0.0)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True])
def test_density_outside_unit_interval_is_rejected(density):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        WeightSparsity(density=density)


def test_unknown_pattern_lists_the_parameters():
    reg = WeightSparsity(density=0.5, anneal_steps=0, params=["*.attn.*"])
    with pytest.raises(ValueError, match=r"'\*\.attn\.\*' matches no weight tensor.*candidates: 2\.weight, 4\.weight"):
        reg.setup(mlp())


def test_missing_anneal_steps_in_a_plain_loop_is_explained():
    with pytest.raises(ValueError, match="pass anneal_steps"):
        plain_loop(mlp(), [WeightSparsity(density=0.5)], steps=1)


def test_transformer_lens_selection_skips_embedding_and_unembedding():
    from interp_train.models.transformer import Transformer

    model = Transformer(d_vocab=12, d_vocab_out=11, n_ctx=3, d_model=8, n_heads=2, d_head=4, d_mlp=16, init_seed=0)
    names = list(select_parameters(model))
    assert len(names) == 6 and all(any(k in n for k in (".attn.", ".mlp.")) for n in names)
    assert len(select_parameters(model, include_embeddings=True)) == 9  # + embed, pos_embed, unembed


@pytest.mark.parametrize("kind", ["WeightSparsity", "WeightL1"])
def test_a_new_model_at_a_freed_models_id_gets_its_own_parameters(kind):
    from tests.helpers import model_at_a_freed_id
    regs = []

    def remember(model):
        reg = WeightSparsity(0.5, anneal_steps=0) if kind == "WeightSparsity" else WeightL1()
        regs.append(reg)
        return [id(p) for p in (reg.selected(model) if kind == "WeightL1" else [p for _, p in reg.selected(model)])]

    found = model_at_a_freed_id(lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), remember)
    if found is None:
        pytest.skip("CPython did not reuse a freed model's id in 500 tries")
    _, second = found
    reg = regs[-1]
    got = reg.selected(second) if kind == "WeightL1" else [p for _, p in reg.selected(second)]
    assert [p is q for p, q in zip(got, [second[0].weight, second[1].weight])] == [True, True]
