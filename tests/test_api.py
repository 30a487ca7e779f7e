"""The regularizer plugin API: schedules, attachment, logging, checkpoint state, bad input."""

import math

import pytest
import torch
from torch import nn

from interp_train import RegularizedMixin
from interp_train import (
    Constant, Cosine, LinearWarmup, NonFiniteRegularizerError, Regularizer, attach_regularizers,
    regularized_loss,
)
from interp_train.losses import per_example_cross_entropy, target_score
from interp_train.sites import resolve_site, run_model
from tests.helpers import ActivationL2, PlainClassifier, quiet_trainer, tiny_mlp, toy_loader


class Broken(Regularizer):
    def terms(self, ctx):
        return {"bad": torch.tensor(float("nan"))}


def test_schedules_values():
    assert Constant(0.3)(1000) == 0.3
    w = LinearWarmup(2.0, warmup_steps=10)
    assert [w(0), w(5), w(10), w(50)] == [0.0, 1.0, 2.0, 2.0]
    c = Cosine(1.0, total_steps=110, warmup_steps=10, final=0.0)
    assert c(5) == pytest.approx(0.5)
    assert c(10) == pytest.approx(1.0)
    assert c(60) == pytest.approx(0.5)  # half way through the decay: (1 + cos(pi/2)) / 2
    assert c(110) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_negative_or_nonfinite_weight_is_rejected(bad):
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0, got"):
        ActivationL2(weight=bad)


def test_cosine_rejects_warmup_longer_than_total():
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be smaller than total_steps \(5\)"):
        Cosine(1.0, total_steps=5, warmup_steps=10)


def test_plain_loop_total_is_task_plus_weighted_terms():
    model = tiny_mlp()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    reg_in = ActivationL2("input", weight=0.5, name="in")
    reg_hidden = ActivationL2("1", weight=LinearWarmup(1.0, warmup_steps=4), name="hidden")
    out = regularized_loss(model, x, y, [reg_in, reg_hidden])
    task = nn.functional.cross_entropy(model(x), y)
    hidden = torch.tanh(model[0](x))
    assert out.task_loss.item() == pytest.approx(task.item(), rel=1e-6)
    assert out.terms["in/l2"].item() == pytest.approx(x.pow(2).sum(1).mean().item(), rel=1e-6)
    assert "hidden/l2" not in out.terms  # weight 0 at step 0: skipped
    assert out.total.item() == pytest.approx(task.item() + 0.5 * x.pow(2).sum(1).mean().item(), rel=1e-6)
    out2 = regularized_loss(model, x, y, [reg_in, reg_hidden])  # step 1: warm-up weight 0.25
    assert out2.weights["hidden"] == 0.25
    assert out2.terms["hidden/l2"].item() == pytest.approx(hidden.pow(2).sum(1).mean().item(), rel=1e-6)
    logs = out2.logs()
    assert logs["hidden/l2_weighted"] == pytest.approx(0.25 * logs["hidden/l2"])
    assert reg_in.step == 2


def test_unknown_layer_lists_available_names():
    model = tiny_mlp()
    with pytest.raises(KeyError, match=r"unknown layer 'blocks.9'.*one of: 0, 1, 2"):
        regularized_loss(model, torch.randn(2, 6), torch.zeros(2, dtype=torch.long), [ActivationL2("blocks.9")])


def test_non_finite_term_names_regularizer_and_step():
    model = tiny_mlp()
    reg = Broken(name="broken")
    reg.step = 7
    with pytest.raises(NonFiniteRegularizerError, match=r"regularizer 'broken'.*'bad' = nan at step 7"):
        regularized_loss(model, torch.randn(2, 6), torch.zeros(2, dtype=torch.long), [reg])


def test_token_input_without_named_activation_is_a_clear_error():
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 10))
    tokens = torch.randint(0, 10, (3, 3))
    with pytest.raises(TypeError, match=r"integer tokens have no gradient.*name an activation"):
        regularized_loss(emb, tokens, torch.zeros(3, dtype=torch.long), [ActivationL2("input")])
    out = regularized_loss(emb, tokens, torch.zeros(3, dtype=torch.long), [ActivationL2("0")])
    assert out.terms["activation_l2/l2"].item() == pytest.approx(
        emb[0](tokens).pow(2).flatten(1).sum(1).mean().item(), rel=1e-6)


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match=r"duplicates \['activation_l2'\]"):
        regularized_loss(tiny_mlp(), torch.randn(2, 6), torch.zeros(2, dtype=torch.long),
                         [ActivationL2(), ActivationL2()])


def test_target_scores_match_manual_values():
    out = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = torch.tensor([1, 2])
    assert torch.allclose(target_score(out, y, "logit"), torch.tensor([2.0, 3.0]))
    logp = torch.log_softmax(out, -1)
    assert torch.allclose(target_score(out, y, "logprob"), torch.stack([logp[0, 1], logp[1, 2]]))
    assert torch.allclose(per_example_cross_entropy(out, y), -torch.stack([logp[0, 1], logp[1, 2]]))
    seq = torch.randn(2, 3, 4)
    assert torch.allclose(per_example_cross_entropy(seq, torch.tensor([0, 1])),
                          nn.functional.cross_entropy(seq[:, -1], torch.tensor([0, 1]), reduction="none"))
    with pytest.raises(ValueError, match="unknown target 'margin'"):
        target_score(out, y, "margin")


def test_lightning_attach_logs_terms_and_keeps_training_step_signature():
    model = attach_regularizers(PlainClassifier(), [ActivationL2("net.1", weight=0.1, name="hid")])
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(model, toy_loader())
    logged = trainer.callback_metrics
    for key in ["reg/task_loss", "reg/hid/l2", "reg/hid/l2_weighted", "reg/hid/weight", "reg/total_loss"]:
        assert key in logged, key
    assert float(logged["reg/hid/l2_weighted"]) == pytest.approx(0.1 * float(logged["reg/hid/l2"]), rel=1e-5)
    assert float(logged["reg/total_loss"]) == pytest.approx(
        float(logged["reg/task_loss"]) + float(logged["reg/hid/l2_weighted"]), rel=1e-5)
    assert model.regularizers[0].step == 3


def test_lightning_attach_rejects_unknown_layer_before_training():
    with pytest.raises(KeyError, match=r"unknown layer 'net.7'.*net.0"):
        attach_regularizers(PlainClassifier(), [ActivationL2("net.7")])


def test_schedule_state_survives_checkpoint_resume(tmp_path):
    sched = LinearWarmup(1.0, warmup_steps=10)
    model = attach_regularizers(PlainClassifier(), [ActivationL2("net.1", weight=sched, name="hid")])
    trainer = quiet_trainer(max_steps=4, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, toy_loader())
    ckpt = tmp_path / "four.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert saved["regularizers.0._extra_state"] == {"step": 4}

    fresh = attach_regularizers(PlainClassifier(), [ActivationL2("net.1", weight=LinearWarmup(1.0, warmup_steps=10), name="hid")])
    assert fresh.regularizers[0].step == 0
    trainer2 = quiet_trainer(max_steps=6, default_root_dir=tmp_path)
    trainer2.fit(fresh, toy_loader(), ckpt_path=ckpt)
    assert fresh.regularizers[0].step == 6
    assert fresh.regularizers[0].current_weight() == pytest.approx(0.6)
    assert float(trainer2.callback_metrics["reg/hid/weight"]) == pytest.approx(0.5)  # weight at step 5


def test_site_edit_and_record_on_module_path():
    model = tiny_mlp()
    x = torch.randn(4, 6)
    res = run_model(model, x, record=["1"], edit={"1": lambda a: a * 0})
    assert torch.allclose(res.activations["1"], torch.zeros(4, 8))
    assert torch.allclose(res.output, model[2].bias.expand(4, 3))
    assert resolve_site(model, "input") is None


class DirectSubclass(RegularizedMixin, PlainClassifier.__mro__[1]):
    """Mixin first, with its own training_step (the recipe pattern): must still be regularized."""

    def __init__(self, regs):
        super().__init__()
        self.net = tiny_mlp()
        self.set_regularizers(regs)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class CallsSuper(RegularizedMixin, PlainClassifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("make", [
    lambda regs: DirectSubclass(regs),
    lambda regs: _with_regs(CallsSuper(), regs),
])
def test_subclass_with_own_training_step_is_regularized_exactly_once(make):
    torch.manual_seed(0)
    model = make([ActivationL2("net.1", weight=0.1, name="hid")])
    x, y = next(iter(toy_loader()))
    out = model.training_step((x, y), 0)
    hidden = torch.tanh(model.net[0](x))
    expected = nn.functional.cross_entropy(model(x), y) + 0.1 * hidden.pow(2).sum(1).mean()
    assert float(out) == pytest.approx(float(expected), rel=1e-6)
    assert model.regularizers[0].step == 1


def _with_regs(model, regs):
    model.set_regularizers(regs)
    return model
