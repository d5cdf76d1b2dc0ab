import copy

import torch
import torch.nn.functional as F

from mixmask.config import load_config
from mixmask.data.batch import Batch
from mixmask.methods import build_method
from mixmask.methods.common import ema_update


def tiny_method(*overrides):
    config = load_config(None, ["model.width=0.125", "method.mocov2.proj_hidden_dim=32",
                                "method.mocov2.proj_output_dim=16", "method.mocov2.queue_size=64",
                                "train.batch_size=8", *overrides])
    torch.manual_seed(0)
    return build_method(config)


def views(batch=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 32, 32, generator=generator),
            torch.randn(batch, 3, 32, 32, generator=generator))


def test_ema_update_matches_formula():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = {name: 0.9 * t + 0.1 * o for (name, t), o in
                zip(target.state_dict().items(), online.state_dict().values(), strict=True)}
    ema_update(target, online, 0.9)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, expected[name])


def test_ema_update_copies_batch_norm_buffers():
    """BN running statistics (and the batch counter) are copied, not averaged (the MoCo and
    BYOL references leave them to the target's own forwards; see ema_update)."""
    online, target = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    online.train()(torch.randn(16, 4) * 3 + 1)
    online(torch.randn(16, 4))
    ema_update(target, online, 0.99)
    torch.testing.assert_close(target.running_mean, online.running_mean)
    torch.testing.assert_close(target.running_var, online.running_var)
    assert int(target.num_batches_tracked) == 2
    torch.testing.assert_close(target.weight, 0.99 * torch.ones(4) + 0.01 * online.weight)


def test_no_gradient_reaches_the_key_encoder_and_ema_moves_it():
    method = tiny_method("method.masking=mixmask", "method.mocov2.symmetric=false")
    key_before = copy.deepcopy(method.target_backbone.state_dict())
    online_before = copy.deepcopy(method.backbone.state_dict())
    output = method.training_step(Batch.from_views(*views()), torch.Generator().manual_seed(0))
    output.loss.backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(p.grad is None for p in method.target_projector.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters())
    with torch.no_grad():
        for parameter in method.backbone.parameters():
            parameter.sub_(0.1 * parameter.grad)
    method.after_optimizer_step(output, 0.0)
    m = method.momentum
    for name, parameter in method.target_backbone.named_parameters():
        online_now = dict(method.backbone.named_parameters())[name]
        torch.testing.assert_close(parameter, m * key_before[name] + (1 - m) * online_now)
        assert not torch.equal(online_now, online_before[name]) or "bn" in name


def test_queue_enqueues_keys_once_per_step():
    method = tiny_method("method.masking=mixmask", "method.mocov2.symmetric=false")
    queue_before = method.queue.clone()
    view1, view2 = views()
    # Independent keys: a copy of the key encoder (train-mode BN, as in the step).
    key_encoder = copy.deepcopy(torch.nn.Sequential(method.target_backbone,
                                                    method.target_projector))
    with torch.no_grad():
        expected_keys = F.normalize(key_encoder(view2), dim=1)
    output = method.training_step(Batch.from_views(view1, view2), torch.Generator().manual_seed(0))
    output.loss.backward()
    method.after_optimizer_step(output, 0.0)
    changed = (method.queue != queue_before).any(dim=1)
    # Three loss terms used the keys; the queue still received one batch of them.
    assert changed.sum() == 8 and changed[:8].all()
    assert int(method.queue_pointer) == 8
    torch.testing.assert_close(method.queue[:8], expected_keys)


def test_symmetric_loss_enqueues_both_views_and_wraps_around():
    method = tiny_method("method.mocov2.symmetric=true", "method.mocov2.queue_size=24")
    for step in range(2):
        output = method.training_step(Batch.from_views(*views(seed=step)),
                                      torch.Generator().manual_seed(step))
        output.loss.backward()
        method.after_optimizer_step(output, 0.0)
    assert int(method.queue_pointer) == (2 * 16) % 24


def test_mixmask_loss_is_clean_plus_lambda_weighted_terms():
    method = tiny_method("method.masking=mixmask", "method.mocov2.symmetric=false",
                         "method.mask.generator=exact_count")
    output = method.training_step(Batch.from_views(*views()), torch.Generator().manual_seed(0))
    logs = output.logs
    assert torch.isclose(logs["lambda_mixmask"], torch.tensor(0.5))
    # loss = clean + lam * mixed + (1 - lam) * switched: at init all InfoNCE terms are close
    # to log(K + 1), so the total is about twice the clean loss.
    assert torch.isfinite(output.loss)
    assert 1.6 < (output.loss / logs["loss_clean"]).item() < 2.4
