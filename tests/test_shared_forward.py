"""One forward pass per regularized Lightning step: ``regularizer_forward`` and RecipeModule's
``shared_forward``. The reference is the loss and gradient written out by hand with plain
autograd (task cross-entropy + w · mean_i ||tanh(W1 x_i + b1)||²); the pass count comes from a
forward hook on the network."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from interp_train import RegularizedMixin
from interp_train.recipes import RecipeModule
from tests.helpers import ActivationL2, PlainClassifier, quiet_trainer, tiny_mlp, toy_loader

WEIGHT = 0.1


def HiddenL2(at):
    return ActivationL2(at, weight=WEIGHT, name="hid")


def hand_loss(net: nn.Sequential, x, y):
    hidden = torch.tanh(x @ net[0].weight.T + net[0].bias)
    logits = hidden @ net[2].weight.T + net[2].bias
    return F.cross_entropy(logits, y) + WEIGHT * hidden.pow(2).sum(1).mean()


class SharesItsForward(RegularizedMixin, PlainClassifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.regularizer_forward(batch), batch[1])


def count_passes(net: nn.Module) -> list[int]:
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    return calls


def step_and_grads(module, net, batch):
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return float(loss), [p.grad.clone() for p in net.parameters()]


def hand_grads(net, batch):
    net.zero_grad()
    loss = hand_loss(net, *batch)
    loss.backward()
    return float(loss), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("shared, passes", [(True, 1), (False, 2)])
def test_recipe_module_step_passes_and_gradient_match_the_hand_computation(shared, passes):
    torch.manual_seed(0)
    module = RecipeModule(tiny_mlp(), [HiddenL2("model.1")], optimizer="sgd", lr=0.05, shared_forward=shared)
    batch = next(iter(toy_loader()))
    calls = count_passes(module.model)
    loss, grads = step_and_grads(module, module.model, batch)
    assert len(calls) == passes
    ref_loss, ref_grads = hand_grads(module.model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_recipe_module_without_regularizers_runs_one_plain_pass():
    module = RecipeModule(tiny_mlp(), [], optimizer="sgd")
    x, y = batch = next(iter(toy_loader()))
    calls = count_passes(module.model)
    loss = module.training_step(batch, 0)
    assert len(calls) == 1
    assert float(loss) == pytest.approx(float(F.cross_entropy(module.model(x), y)), rel=1e-6)


def test_user_module_shares_its_forward_and_trains_like_the_hand_loss():
    torch.manual_seed(0)
    module = SharesItsForward()
    module.set_regularizers([HiddenL2("net.1")])
    reference = tiny_mlp()
    reference.load_state_dict(module.net.state_dict())
    calls = count_passes(module.net)
    quiet_trainer(max_steps=3).fit(module, toy_loader())
    assert len(calls) == 3  # one pass per step
    opt = torch.optim.SGD(reference.parameters(), lr=module.lr)
    for _, batch in zip(range(3), toy_loader()):
        opt.zero_grad()
        hand_loss(reference, *batch).backward()
        opt.step()
    for p, ref in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_a_context_left_by_a_failed_step_does_not_serve_the_next_batch():
    torch.manual_seed(0)
    module = RecipeModule(tiny_mlp(), [HiddenL2("model.1")], optimizer="sgd", shared_forward=False)
    loader = iter(toy_loader())
    first, second = next(loader), next(loader)
    module.regularizer_forward(first)  # as a step that raised after its forward pass would leave it
    loss = module.training_step(second, 1)
    assert float(loss) == pytest.approx(float(hand_loss(module.model, *second)), rel=1e-6)


def test_regularizer_forward_before_set_regularizers_is_the_plain_output():
    module = SharesItsForward()
    x, y = batch = next(iter(toy_loader()))
    torch.testing.assert_close(module.regularizer_forward(batch), module.net(x))
