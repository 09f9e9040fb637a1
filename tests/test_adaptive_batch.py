"""The adaptive batch (lars.adaptive) against float64 references written from the equations.

References: per-sample gradients from a plain autograd loop over single samples; micro-batch
gradients from autograd on each micro-batch; variances, inner products and the orthogonal parts
o_i built explicitly (no closed forms), as AdAdaGrad (arXiv:2402.11215) and McCandlish et al.
(2018, App. A.1) state them.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from torch import nn

from lars.adaptive import (
    BatchController,
    BatchGrowth,
    BatchState,
    MicroBatchEstimator,
    Moments,
    PerSampleEstimator,
    Smoother,
    b_new,
    check_test_settings,
    lr_factor,
    next_batch_size,
)

LOSS = nn.CrossEntropyLoss()


def conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)
    ).double()


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def var(samples: torch.Tensor) -> float:
    """sum over coordinates of the unbiased variance over dim 0, by hand."""
    centred = samples - samples.mean(0, keepdim=True)
    return float((centred**2).sum() / (samples.shape[0] - 1))


def reference_statistics(grads: list[list[torch.Tensor]], scale: float = 1.0, u=None) -> dict:
    """The tests' numerators over samples grads[i][T], with direction u (default: g-bar)."""
    per_tensor = [torch.stack([g[t] for g in grads]) for t in range(len(grads[0]))]
    gbar = [s.mean(0) for s in per_tensor]
    u = gbar if u is None else u
    var_norm = var_ip = var_orth = 0.0
    for s, d in zip(per_tensor, u):
        flat, d = s.flatten(1), d.flatten()
        ip = flat @ d
        orth = flat - torch.outer(ip, d) / d.dot(d)
        var_norm += var(flat)
        var_ip += var(ip[:, None])
        var_orth += var(orth)
    g2 = sum(float(g.pow(2).sum()) for g in gbar)
    return dict(
        var_norm=scale * var_norm,
        var_inner_product=scale * var_ip,
        var_orth=scale * var_orth,
        grad_norm_sq=g2,
    )


def assert_moments(m: Moments, ref: dict, rtol=1e-10) -> None:
    for name, value in ref.items():
        assert getattr(m, name) == pytest.approx(value, rel=rtol, abs=1e-14), name


# ---------------------------------------------------------------- per-sample estimator


def per_sample_loop(model, images, labels) -> list[list[torch.Tensor]]:
    """Independent reference: one autograd call per sample on a copy whose BatchNorm uses the
    sample's own statistics (the reference's track_running_stats=False)."""
    single = copy.deepcopy(model)
    for m in single.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    params = [p for p in single.parameters()]
    return [
        list(torch.autograd.grad(LOSS(single(x[None]), y[None]), params))
        for x, y in zip(images, labels)
    ]


@pytest.mark.parametrize("train_mode", [True, False])
def test_per_sample_statistics_match_a_float64_loop(train_mode):
    model = conv_bn_model().train(train_mode)
    torch.manual_seed(2)
    images, labels = torch.randn(8, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
    running = model[1].running_mean.clone()
    est = PerSampleEstimator(model, LOSS, max_samples=7, chunk_size=3, inner_products=True)
    m = est.moments(images, labels)
    ref = reference_statistics(per_sample_loop(model, images[:7], labels[:7]))
    assert m.samples == 7
    assert_moments(m, ref)
    assert torch.equal(model[1].running_mean, running)  # the model's statistics untouched
    assert model[1].track_running_stats
    for test, tol in (("norm", 0.3), ("ip", 0.2), ("ip+orth", 0.2)):
        assert b_new(m, test, tol, tol, tol) == pytest.approx(
            _b_new_by_hand(ref, test, tol), rel=1e-10
        )


def _b_new_by_hand(ref: dict, test: str, tol: float) -> float:
    g2 = ref["grad_norm_sq"]
    ip = ref["var_inner_product"] / (tol**2 * g2**2)
    orth = ref["var_orth"] / (tol**2 * g2)
    return {"norm": ref["var_norm"] / (tol**2 * g2), "ip": ip, "ip+orth": max(ip, orth)}[test]


def test_per_sample_mean_is_the_batch_gradient_in_eval_mode():
    model = conv_bn_model().eval()
    torch.manual_seed(3)
    images, labels = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    grads = torch.autograd.grad(LOSS(model(images), labels), list(model.parameters()))
    m = PerSampleEstimator(model, LOSS, max_samples=6, chunk_size=4).moments(images, labels)
    assert m.grad_norm_sq == pytest.approx(sum(float(g.pow(2).sum()) for g in grads), rel=1e-12)
    assert math.isnan(m.var_inner_product)  # not asked for


# ---------------------------------------------------------------- micro-batch estimator


def micro_batches(count: int, b: int, seed: int = 4):
    torch.manual_seed(seed)
    return [
        (torch.randn(b, 5, dtype=torch.float64), torch.randint(0, 3, (b,))) for _ in range(count)
    ]


def run_step(model, est, batches, k, scale=1.0):
    """What lars.step does with the estimator: loss / k, scaled, backward; then unscale."""
    model.zero_grad(set_to_none=True)
    est.begin_step(k, loss_scale=torch.tensor(scale, dtype=torch.float64) if scale != 1 else None)
    for x, y in batches:
        (LOSS(model(x), y) / k * scale).backward()
    for p in model.parameters():
        p.grad.div_(scale)


def micro_means(model, batches):
    return [
        list(torch.autograd.grad(LOSS(model(x), y), list(model.parameters()))) for x, y in batches
    ]


@pytest.mark.parametrize("mode", ["none", "copy"])
def test_micro_batch_statistics_are_the_formulas_on_the_micro_batch_means(mode):
    model, b, k = mlp(), 3, 5
    batches = micro_batches(k, b)
    est = MicroBatchEstimator(list(model.parameters()), inner_products=mode).attach()
    run_step(model, est, batches, k, scale=1024.0)
    m = est.finish(micro_batch=b)
    means = micro_means(model, batches)
    ref = reference_statistics(means, scale=b)
    if mode == "none":
        ref = {"var_norm": ref["var_norm"], "grad_norm_sq": ref["grad_norm_sq"]}
        assert math.isnan(m.var_inner_product) and math.isnan(m.var_orth)
    assert_moments(m, ref, rtol=1e-9)
    # McCandlish et al. App. A.1, by hand from S and ||g-bar||^2
    s = sum(sum(float(t.pow(2).sum()) for t in g) for g in means) / k
    g2 = ref["grad_norm_sq"]
    assert m.var_norm == pytest.approx(b * k * (s - g2) / (k - 1), rel=1e-9)
    assert m.grad_norm_sq_unbiased == pytest.approx((k * g2 - s) / (k - 1), rel=1e-9)
    assert m.samples == k


def test_micro_batch_previous_direction_lags_one_test_step():
    model, b, k = mlp(), 2, 4
    est = MicroBatchEstimator(list(model.parameters()), inner_products="previous").attach()
    u = None
    for step in range(3):  # the third step checks the direction buffers are refilled
        batches = micro_batches(k, b, seed=5 + step)
        run_step(model, est, batches, k)
        m = est.finish(micro_batch=b)
        means = micro_means(model, batches)
        if u is None:
            assert math.isnan(m.var_inner_product)  # no direction yet
        else:
            assert_moments(m, reference_statistics(means, scale=b, u=u), rtol=1e-9)
        u = [torch.stack(t).mean(0) for t in zip(*means)]
        with torch.no_grad():  # move the weights: each step's g-bar differs
            for p in model.parameters():
                p.sub_(0.1 * p.grad)


def test_inactive_steps_collect_nothing():
    model = mlp()
    est = MicroBatchEstimator(list(model.parameters())).attach()
    model.zero_grad()
    est.begin_step(2, active=False)
    for x, y in micro_batches(2, 3):
        (LOSS(model(x), y) / 2).backward()
    assert est.finish(micro_batch=3) is None and est.norms == []
    est.detach()
    assert est.handles == []


class ThreadAllreduce:
    """A sum over 'ranks' that are threads: each caller blocks until all have contributed."""

    def __init__(self, ranks: int) -> None:
        self.barrier, self.slots = threading.Barrier(ranks), {}

    def for_rank(self, rank: int):
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[r] for r in sorted(self.slots))
            self.barrier.wait()
            return total

        return reduce_sum


def simulated_ranks(batches, ranks: int, mode: str, b: int):
    """`ranks` copies of the model, each with its share of the micro-batches; the averaged
    gradient is set on every copy (Horovod's Average), then all finish together."""
    k = len(batches) // ranks
    models = [mlp() for _ in range(ranks)]
    ests = [MicroBatchEstimator(list(m.parameters()), inner_products=mode).attach() for m in models]
    for r in range(ranks):
        run_step(models[r], ests[r], batches[r * k : (r + 1) * k], k)
    for params in zip(*(m.parameters() for m in models)):
        mean = sum(p.grad for p in params) / ranks
        for p in params:
            p.grad = mean.clone()
    comm, out = ThreadAllreduce(ranks), [None] * ranks

    def work(r):
        out[r] = ests[r].finish(micro_batch=b, reduce_sum=comm.for_rank(r))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("mode", ["none", "copy"])
def test_two_ranks_k2_equal_one_rank_k4(mode):
    b, batches = 3, micro_batches(4, 3, seed=7)
    (single,) = simulated_ranks(batches, 1, mode, b)
    pair = simulated_ranks(batches, 2, mode, b)
    for m in pair:
        for name in ("var_norm", "var_inner_product", "var_orth", "grad_norm_sq"):
            a, c = getattr(m, name), getattr(single, name)
            assert (math.isnan(a) and math.isnan(c)) or a == pytest.approx(c, rel=1e-12), name
        assert m.samples == single.samples == 4
    decisions = []
    for (micro, ranks, k), m in (((3, 1, 4), single), ((3, 2, 2), pair[1])):
        state = BatchState(micro, k, ranks, start_batch=12)
        BatchController(state, BatchGrowth(ranks, 480, 12), "norm", eta=0.5).observe(m)
        target = state.last["target"]
        # the same wanted batch; each geometry reaches it in its own steps of micro x ranks
        assert state.global_batch_size == math.ceil(target / (micro * ranks)) * micro * ranks
        decisions.append(target)
    assert decisions[0] == decisions[1] == next_batch_size(12, b_new(single, "norm", 0.5), 480)
    assert decisions[0] > 12


# ---------------------------------------------------------------- growth and policy


def test_growth_rule_never_shrinks_and_caps():
    assert next_batch_size(64, 10.2, 1024) == 64
    assert next_batch_size(64, 100.2, 1024) == 101
    assert next_batch_size(64, 5000.0, 1024) == 1024
    assert next_batch_size(64, math.inf, 1024) == 1024
    assert next_batch_size(64, math.nan, 1024) == 64


def test_geometry_grows_k_first_then_micro_and_respects_every_cap():
    growth = BatchGrowth(2, max_batch=180, max_micro_batch=24, max_batches_per_allreduce=4)
    growth.check(8, 1)
    micro, k = 8, 1
    assert growth.geometry_for(micro, k, 40) == (8, 3)  # k first: 8 x 2 x 3 = 48 >= 40
    micro, k = growth.geometry_for(micro, k, 60)
    assert (micro, k) == (8, 4)  # k at its cap: 64 >= 60
    micro, k = growth.geometry_for(micro, k, 100)
    assert (micro, k) == (13, 4)  # then the micro-batch: 13 x 2 x 4 = 104
    torch.manual_seed(8)
    for target in torch.randint(1, 2000, (200,)).tolist():
        new = growth.geometry_for(micro, k, target)
        assert new[0] >= micro and new[1] >= k  # never shrinks
        assert new[0] <= 24 and new[1] <= 4 and new[0] * 2 * new[1] <= 180  # every cap
        assert new[0] * 2 * new[1] >= min(target, 176)  # reaches the target (176: 22 x 2 x 4)
        micro, k = new
    assert (micro, k) == (22, 4)  # 23 x 2 x 4 = 184 would pass the max


def test_micro_batch_first_order_is_the_references():
    growth = BatchGrowth(1, max_batch=256, max_micro_batch=32, order="micro-batch")
    assert growth.geometry_for(8, 1, 20) == (20, 1)
    assert growth.geometry_for(20, 1, 100) == (32, 4)  # micro capped, then k
    assert growth.geometry_for(32, 4, 10_000) == (32, 8)  # max batch


@pytest.mark.parametrize(
    "growth, flag",
    [
        (BatchGrowth(2, max_batch=8, max_micro_batch=32), "--max-batch-size"),
        (BatchGrowth(2, max_batch=64, max_micro_batch=4), "--max-micro-batch-size"),
        (BatchGrowth(2, 512, 16, max_batches_per_allreduce=4), "--max-micro-batch-size"),
    ],
)
def test_caps_that_cannot_work_are_refused_naming_the_flag(growth, flag):
    with pytest.raises(ValueError, match=flag):
        growth.check(8, 1)


def test_bad_tolerances_are_refused_naming_the_flag():
    for kwargs, flag in (((0.0, 0.1, 0.1), "--eta"), ((0.1, -1, 0.1), "--theta")):
        with pytest.raises(ValueError, match=flag):
            check_test_settings("norm", *kwargs)
    check_test_settings("ip+orth", 0.1, 0.1, 0.1)


def test_adascale_gain_ratio():
    trace, g2, b0, batch = 50.0, 0.5, 32, 256
    b_simple = trace / g2
    gain = (trace / b0 + g2) / (trace / batch + g2)  # Johnson et al.: (sigma^2 + G^2) / ...
    assert lr_factor("adascale", batch, b0, b_simple) == pytest.approx(gain, rel=1e-12)
    assert 1.0 <= gain <= batch / b0
    assert lr_factor("adascale", batch, b0, math.inf) == batch / b0
    assert lr_factor("sqrt", batch, b0) == pytest.approx(math.sqrt(8))
    assert lr_factor("linear", batch, b0) == 8 and lr_factor("none", batch, b0) == 1


def test_ema_smooths_numerator_and_denominator_separately():
    sm, beta = Smoother(0.5), 0.5
    values = [(4.0, 1.0), (8.0, 3.0), (2.0, 0.5)]
    num = den = 0.0
    for t, (v, g) in enumerate(values, start=1):
        m = sm.update(Moments(v, math.nan, math.nan, g))
        num, den = beta * num + (1 - beta) * v, beta * den + (1 - beta) * g
        assert m.var_norm == pytest.approx(num / (1 - beta**t))
        assert m.grad_norm_sq == pytest.approx(den / (1 - beta**t))


def test_batch_state_round_trips_through_a_checkpoint(tmp_path):
    def controller(state):
        growth = BatchGrowth(2, 1024, 64, max_batches_per_allreduce=8)
        return BatchController(
            state, growth, "ip+orth", interval=2, lr_policy="adascale", ema_beta=0.6
        )

    torch.manual_seed(9)
    moments = [Moments(*(torch.rand(4) * 10).tolist(), samples=4) for _ in range(8)]
    run = controller(BatchState(8, 1, 2, start_batch=16))
    for m in moments[:4]:
        run.observe(m)
        run.after_step()
    path = tmp_path / "state.pt"
    torch.save({"adaptive_batch": run.state.to_payload()}, path)
    payload = torch.load(path, weights_only=True)["adaptive_batch"]
    resumed = controller(BatchState.from_payload(payload))
    for m in moments[4:]:
        run.observe(m), resumed.observe(m)
        run.after_step(), resumed.after_step()
        assert resumed.state == run.state
    assert run.state.global_batch_size > 16 and run.state.samples_seen > 0
    assert run.scalars()["batch/size"] == run.state.global_batch_size


def test_test_due_every_interval_until_the_max():
    state = BatchState(8, 1, 1, start_batch=8)
    ctl = BatchController(state, BatchGrowth(1, 64, 64), "norm", interval=3)
    assert [ctl.test_due(s) for s in range(4)] == [True, False, False, True]
    ctl.observe(Moments(1.0, math.nan, math.nan, 0.0))  # zero gradient: straight to the max
    assert state.global_batch_size == 64 and not ctl.test_due(6)


# ---------------------------------------------------------------- under Horovod (mpirun -np 2)

HOROVOD_WORKER = """
import torch
import horovod.torch as hvd
import tests.test_adaptive_batch as t
from lars.adaptive import MicroBatchEstimator

hvd.init()
torch.set_num_threads(1)
model, b = t.mlp(), 3
est = MicroBatchEstimator(list(model.parameters()), inner_products="copy").attach()
opt = hvd.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
    backward_passes_per_step=2,
)
reduce_sum = lambda x: hvd.allreduce(x, op=hvd.Sum, name="lars.batch_test")
for step, k in enumerate((2, 3, 3)):  # grows after the first step, between steps
    if step and k != opt.backward_passes_per_step:
        opt.set_backward_passes_per_step(k)
    every = t.micro_batches(2 * k, b, seed=10 + step)  # the same 2k micro-batches everywhere
    mine = every[hvd.rank() * k : (hvd.rank() + 1) * k]
    ref = t.reference_statistics(t.micro_means(model, every), scale=b)
    opt.zero_grad()
    est.begin_step(k)
    for x, y in mine:
        (t.LOSS(model(x), y) / k).backward()
    opt.synchronize()
    m = est.finish(micro_batch=b, reduce_sum=reduce_sum)
    assert m.samples == 2 * k, m
    t.assert_moments(m, ref, rtol=1e-9)
    with opt.skip_synchronize():
        opt.step()
print(f"rank {hvd.rank()}: OK")
"""


@pytest.mark.distributed
def test_micro_batch_estimator_under_horovod_with_growing_k(tmp_path):
    """The hooks see each micro-batch before Horovod's in-place allreduce; after
    set_backward_passes_per_step the statistics still cover exactly ranks x k micro-batches."""
    from conftest import check_ok, require_distributed, run_script

    require_distributed()
    script = tmp_path / "adaptive_worker.py"
    script.write_text(HOROVOD_WORKER)
    out = check_ok(run_script([], np=2, timeout=240, script=script, env={"PYTHONPATH": "."}))
    assert "rank 0: OK" in out and "rank 1: OK" in out
