import math

import pytest
import torch

from ldm.optim.schedules import SCHEDULES, make_lr_lambda, make_scheduler

N, W = 110, 10  # total steps, warm-up steps: the decay runs over the last 100 steps


@pytest.mark.parametrize("name", SCHEDULES)
def test_warmup_is_linear_from_zero(name):
    m = make_lr_lambda(name, N, warmup=W)
    assert m(0) == 0.0
    assert m(5) == pytest.approx(0.5)
    assert m(W - 1) == pytest.approx(0.9)
    assert m(W) == pytest.approx(1.0)  # end of warm-up: the full learning rate


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup"])
def test_constant(name):
    assert make_lr_lambda(name, N)(0) == 1.0
    m = make_lr_lambda(name, N, warmup=W)
    assert [m(s) for s in (W, 60, N - 1, N, 10 * N)] == [1.0] * 5


def test_linear():
    m = make_lr_lambda("linear", N, warmup=W)
    assert m(60) == pytest.approx(0.5)          # halfway through the decay
    assert m(N - 1) == pytest.approx(0.01)      # last training step: 1 - 99/100
    assert m(N) == 0.0
    assert m(N + 50) == 0.0                     # stays at the end value
    assert make_lr_lambda("linear", 100)(0) == 1.0  # without warm-up it starts at 1


def test_cosine():
    m = make_lr_lambda("cosine", N, warmup=W)
    assert m(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))  # ~0.8536
    assert m(60) == pytest.approx(0.5)
    assert m(N - 1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert m(N) == pytest.approx(0.0)


def test_cosine_with_restarts_returns_to_one_at_each_cycle():
    m = make_lr_lambda("cosine_with_restarts", N, warmup=W, num_cycles=5)  # cycles of 20 steps
    for start in (10, 30, 50, 70, 90):
        assert m(start) == 1.0  # exactly: the cycle position is computed in integers
        assert m(start + 10) == pytest.approx(0.5)  # mid-cycle
        assert m(start + 19) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))  # just before a restart
    assert m(N) == 0.0 and m(N + 7) == 0.0
    long = make_lr_lambda("cosine_with_restarts", 3000, num_cycles=3)
    assert [long(s) for s in (0, 1000, 2000)] == [1.0, 1.0, 1.0]
    # with one cycle it is plain cosine
    one, cos = make_lr_lambda("cosine_with_restarts", N, warmup=W), make_lr_lambda("cosine", N, warmup=W)
    assert all(one(s) == pytest.approx(cos(s)) for s in range(N + 1))


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_polynomial(power):
    m = make_lr_lambda("polynomial", N, warmup=W, power=power)
    assert m(W) == pytest.approx(1.0)
    assert m(60) == pytest.approx(0.5**power)
    assert m(85) == pytest.approx(0.25**power)
    assert m(N) == 0.0


def test_polynomial_power_one_is_linear():
    poly, lin = make_lr_lambda("polynomial", N, warmup=W), make_lr_lambda("linear", N, warmup=W)
    assert all(poly(s) == pytest.approx(lin(s)) for s in range(N + 1))


def test_min_lr_ratio_is_the_floor_of_the_decay():
    m = make_lr_lambda("cosine", N, warmup=W, min_lr_ratio=0.1)
    assert m(0) == 0.0                         # warm-up still starts from 0
    assert m(W) == pytest.approx(1.0)
    assert m(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert m(N) == pytest.approx(0.1)
    assert make_lr_lambda("linear", N, min_lr_ratio=0.2)(N) == pytest.approx(0.2)


def test_warmup_as_fraction_of_the_run():
    m = make_lr_lambda("linear", 200, warmup=0.1)  # 20 steps
    assert m(10) == pytest.approx(0.5)
    assert m(20) == pytest.approx(1.0)
    assert m(110) == pytest.approx(0.5)
    assert make_lr_lambda("constant", 200, warmup=0.0)(0) == 1.0  # 0.0 means no warm-up


@pytest.mark.parametrize("kwargs, key", [
    (dict(name="cosine_annealing"), "model.params.optimizer.scheduler"),
    (dict(warmup=-1), "model.params.optimizer.warmup"),
    (dict(warmup=1.5), "model.params.optimizer.warmup"),
    (dict(warmup="10"), "model.params.optimizer.warmup"),
    (dict(warmup=True), "model.params.optimizer.warmup"),
    (dict(warmup=100), "model.params.optimizer.warmup"),      # not fewer than total_steps
    (dict(warmup=0.999), "model.params.optimizer.warmup"),    # rounds to all 100 steps
    (dict(num_cycles=0), "model.params.optimizer.num_cycles"),
    (dict(num_cycles=1.5), "model.params.optimizer.num_cycles"),
    (dict(power=0), "model.params.optimizer.power"),
    (dict(min_lr_ratio=1.5), "model.params.optimizer.min_lr_ratio"),
    (dict(total_steps=0), "total_steps"),
])
def test_bad_values_name_the_config_key(kwargs, key):
    args = dict(name="cosine", total_steps=100) | kwargs
    with pytest.raises(ValueError) as e:
        make_lr_lambda(**args)
    assert str(e.value).startswith(key + ":")


def test_error_key_prefix_follows_the_caller():
    with pytest.raises(ValueError, match=r"^train\.opt\.scheduler: unknown schedule 'nope'"):
        make_lr_lambda("nope", 10, key="train.opt")


def _sgd(*lrs):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _run(opt, sched, steps):
    """The lr of every group for each of `steps` optimizer steps, as a training loop sees it."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def test_lambdalr_drives_the_optimizer_lr():
    opt = _sgd(1e-4)
    sched = make_scheduler(opt, "linear", total_steps=6, warmup=2)
    # warm-up 0, 1/2, then decay over 4 steps: 1, 3/4, 1/2, 1/4, then 0
    expected = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lrs[0] for lrs in _run(opt, sched, 7)] == pytest.approx([1e-4 * m for m in expected])


def test_each_param_group_scales_its_own_lr():
    opt = _sgd(1e-4, 1e-6)  # e.g. UNet and text encoder
    sched = make_scheduler(opt, "cosine", total_steps=4)
    seen = _run(opt, sched, 5)
    for step, (unet, text) in enumerate(seen):
        m = 0.5 * (1 + math.cos(math.pi * step / 4))
        assert unet == pytest.approx(1e-4 * m)
        assert text == pytest.approx(1e-6 * m)
    assert len(sched.lr_lambdas) == 2


def _named_sgd(**lrs):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "name": name} for name, lr in lrs.items()]
    return torch.optim.SGD(groups, lr=1.0)


@pytest.mark.parametrize("stop, stop_step", [(4, 4), (0.4, 4), (0.01, 1)])  # a fraction: round(f * 10), >= 1
def test_text_encoder_stop_zeroes_only_the_text_encoder_group(stop, stop_step):
    opt = _named_sgd(unet=1e-4, text_encoder=1e-5)
    sched = make_scheduler(opt, "linear", total_steps=10, warmup=2, text_encoder_stop=stop)
    seen = _run(opt, sched, 10)
    m = make_lr_lambda("linear", 10, warmup=2)
    assert [u for u, _ in seen] == pytest.approx([1e-4 * m(s) for s in range(10)])  # the UNet: unaffected
    assert [t for _, t in seen[:stop_step]] == pytest.approx([1e-5 * m(s) for s in range(stop_step)])
    assert [t for _, t in seen[stop_step:]] == [0.0] * (10 - stop_step)


def test_text_encoder_stop_past_the_end_and_without_a_text_encoder():
    opt = _named_sgd(unet=1e-4, text_encoder=1e-5)
    seen = _run(opt, make_scheduler(opt, "constant", total_steps=5, text_encoder_stop=50), 5)
    assert [t for _, t in seen] == pytest.approx([1e-5] * 5)  # never reached
    opt = _named_sgd(unet=1e-4)
    assert [u for (u,) in _run(opt, make_scheduler(opt, "constant", 5, text_encoder_stop=2), 5)] == [1e-4] * 5


def test_text_encoder_stop_is_checked():
    opt = _named_sgd(unet=1e-4, text_encoder=1e-5)
    with pytest.raises(ValueError, match=r"^model\.params\.optimizer\.text_encoder_stop: expected"):
        make_scheduler(opt, "constant", 10, text_encoder_stop=1.5)
