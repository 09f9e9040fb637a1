"""Every optimizer variant inside hvd.DistributedOptimizer on 2 ranks (mpirun, CPU).

The worker wraps each optimizer the way the trainer does (Horovod rebuilds it as
``Cls(param_groups)``), runs ``broadcast_optimizer_state`` (its zero-gradient step on an
optimizer without state), then three steps on rank-specific data. Each rank checks its weights
against a plain, unwrapped optimizer fed the average of both ranks' gradients, which it computes
itself, so LAMB ``nus``'s global norm must be that of the averaged gradients. The wrapped one runs
the default path (the fused CPU kernel where it builds: the rebuilt class keeps it), the twin the
eager multi-tensor path.
"""

from __future__ import annotations

import pytest
from conftest import check_ok, require_distributed, run_script

pytestmark = pytest.mark.distributed

WORKER = """
import copy
import torch
import horovod.torch as hvd
from lars.optim import LAMB, LARS, TVLARS, _fused
from lars.param_groups import param_groups

CASES = [(LARS, {}), (LARS, {"variant": "nus"}), (LARS, {"variant": "barlowtwins"}),
         (TVLARS, {"lmbda": 0.1}), (TVLARS, {"variant": "authors", "lmbda": 0.1}),
         (LAMB, {}), (LAMB, {"variant": "nus"}), (LAMB, {"variant": "authors"})]
hvd.init()
torch.set_num_threads(1)


def batch(rank, step):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 4, generator=gen) * 5, torch.randint(0, 2, (16,), generator=gen)


def grads_of(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


ok = 0
for cls, kwargs in CASES:
    torch.manual_seed(hvd.rank())  # different initial weights: the broadcast must fix them
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    opt = cls(param_groups(model, 1e-2), lr=0.1, **kwargs)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    twin = copy.deepcopy(model)
    ref = cls(param_groups(twin, 1e-2), lr=0.1, **kwargs)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in ref.param_groups:
        group["foreach"] = True  # eager, whatever the wrapped optimizer runs
    for step in range(3):
        x, y = batch(hvd.rank(), step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        per_rank = [grads_of(twin, *batch(r, step)) for r in range(hvd.size())]
        for p, *gs in zip(twin.parameters(), *per_rank):
            p.grad = sum(gs) / len(gs)
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gathered = hvd.allgather(torch.cat([p.detach().flatten() for p in model.parameters()])[None])
    assert torch.equal(gathered[0], gathered[1]), "ranks differ"
    assert all(torch.isfinite(r).all() for _, r in opt.last_trust_ratios())
    assert all(g["fused"] is None and g["foreach"] is None for g in opt.param_groups)
    ok += 1
print(f"rank {hvd.rank()}: fused kernel {_fused.unavailable_reason() or 'built'}")
print(f"rank {hvd.rank()}: {ok} cases OK")
"""


def test_every_variant_under_horovod(tmp_path):
    require_distributed()
    script = tmp_path / "optim_worker.py"
    script.write_text(WORKER)
    out = check_ok(run_script([], np=2, timeout=240, script=script))
    assert "rank 0: 8 cases OK" in out and "rank 1: 8 cases OK" in out
