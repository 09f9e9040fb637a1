"""Barlow Twins parts (lars.tasks): loss, global-batch BatchNorm, model, views, probe, k-NN."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import require_distributed
from PIL import Image

from lars.data.loaders import RobustDataset
from lars.optim import LARS
from lars.param_groups import param_groups
from lars.tasks.barlowtwins import BarlowTwins, build_barlow_twins, parse_projector
from lars.tasks.bt_augment import BarlowTwinsPair, BarlowTwinsView
from lars.tasks.bt_loss import (
    GlobalBatchNorm,
    barlow_twins_loss,
    convert_batchnorm,
    local_batchnorm,
)
from lars.tasks.knn import knn_top1, weighted_knn_predict
from lars.tasks.linear_probe import ProbeConfig, build_probe, evaluate_probe, run_linear_probe

ROOT = Path(__file__).resolve().parents[1]


def reference_loss(z1, z2, lambd):
    """Eq. 1-2 of Zbontar et al. 2021 in float64 Python loops, normalising each column first."""
    n, d = len(z1), len(z1[0])

    def normalised(z):
        columns = []
        for j in range(d):
            mean = sum(z[b][j] for b in range(n)) / n
            std = math.sqrt(sum((z[b][j] - mean) ** 2 for b in range(n)) / n + 1e-5)
            columns.append([(z[b][j] - mean) / std for b in range(n)])
        return columns

    a, b = normalised(z1), normalised(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c * c
    return loss


def test_loss_matches_float64_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, 7, 5, dtype=torch.float64).unbind()
    z2 = z2 + 0.8 * z1  # correlated views, so both terms matter
    bn = nn.BatchNorm1d(5, affine=False).double()
    for lambd in (0.0051, 0.3):
        parts = barlow_twins_loss(bn(z1), bn(z2), lambd)
        expected = reference_loss(z1.tolist(), z2.tolist(), lambd)
        assert parts.loss.item() == pytest.approx(expected, rel=1e-12)
        assert (parts.on_diag + lambd * parts.off_diag).item() == pytest.approx(expected)


def test_global_batchnorm_on_one_rank_is_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    plain = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2.0)
        plain.bias.uniform_(-1.0, 1.0)
    global_bn = convert_batchnorm(nn.Sequential(plain), lambda t: t)[0]  # one rank's sums
    assert isinstance(global_bn, GlobalBatchNorm) and global_bn.weight.dtype == torch.float64
    y_plain, y_global = plain(x), global_bn(x)
    torch.testing.assert_close(y_global, y_plain, rtol=1e-12, atol=1e-12)
    (grad_plain,) = torch.autograd.grad(y_plain.pow(3).sum(), x)
    (grad_global,) = torch.autograd.grad(y_global.pow(3).sum(), x)
    torch.testing.assert_close(grad_global, grad_plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(global_bn.running_var, plain.running_var)

    def no_communication(tensor):
        raise AssertionError("local_batchnorm must not communicate")

    global_bn.allreduce = no_communication
    torch.testing.assert_close(local_batchnorm(nn.Sequential(global_bn))[0](x), plain(x))
    assert id(global_bn.weight) in {id(p) for p in param_groups(global_bn, 1e-3)[-1]["params"]}


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["horovod", "torch"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(backend):
    require_distributed()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(29400 + os.getpid() % 500)
    command = ["mpirun", "--allow-run-as-root", "-np", "2", "-x", "MASTER_ADDR", "-x"]
    command += [
        "MASTER_PORT",
        "-x",
        "PYTHONPATH",
        sys.executable,
        str(ROOT / "tests/bt_two_ranks.py"),
    ]
    result = subprocess.run(
        [*command, backend], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK {backend}" in result.stdout


def test_model_removes_the_classifier_and_uses_the_real_feature_width():
    model = build_barlow_twins("resnet18_small", projector="64-48-32")
    assert isinstance(model.backbone.fc, nn.Identity) and model.feature_width == 512
    layers = list(model.projector)
    kinds = [type(layer) for layer in layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [layer.in_features for layer in layers if isinstance(layer, nn.Linear)] == [512, 64, 48]
    assert all(layer.bias is None for layer in layers if isinstance(layer, nn.Linear))
    assert model.bn.num_features == 32 and not model.bn.affine
    z1, z2 = model(torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32))
    assert z1.shape == z2.shape == (3, 32)
    with pytest.raises(ValueError, match="pairs"):
        model(torch.randn(3, 3, 32, 32))
    assert build_barlow_twins("mobilenet_v3_small", projector="16").feature_width == 1024
    assert parse_projector("8192-8192-8192") == [8192] * 3
    for bad in ("", "8192-", "a-b", "0-16"):
        with pytest.raises(ValueError, match="--projector"):
            parse_projector(bad)
    with pytest.raises(ValueError, match="--model 'squeezenet1_0'"):
        build_barlow_twins("squeezenet1_0")
    with pytest.raises(ValueError, match="--model 'vit_b_16' cannot run on 32 px"):
        build_barlow_twins("vit_b_16", image_size=32)


def _conv_backbone():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def test_views_of_the_same_images_drive_the_diagonal_towards_one():
    """Two noisy views of each image: c_ii starts well below 1 and LARS brings it near 1."""
    torch.manual_seed(0)
    model = BarlowTwins(_conv_backbone(), 8, [32, 16])
    optimizer = LARS(param_groups(model, 1.5e-6), lr=0.5, trust_coefficient=0.05)
    images = torch.randn(64, 3, 6, 6)

    def diagonal_mean():
        noise = 0.5 * torch.randn(2, *images.shape)
        z1, z2 = model(images + noise[0], images + noise[1])
        c = z1.T @ z2 / images.shape[0]
        return torch.diagonal(c).mean(), barlow_twins_loss(z1, z2)

    with torch.no_grad():
        start, _ = diagonal_mean()
    for _ in range(40):
        _, parts = diagonal_mean()
        optimizer.zero_grad()
        parts.loss.backward()
        optimizer.step()
    with torch.no_grad():
        end, _ = diagonal_mean()
    # measured: 0.726 -> 0.915 (the noise bounds what is reachable below 1)
    assert start < 0.8 and end > 0.88, (start.item(), end.item())


class _Images(torch.utils.data.Dataset):
    """Small random PIL images (index-seeded) through a transform: a stand-in for ImageFolder."""

    def __init__(self, transform, count=4, size=40):
        self.transform, self.count, self.size = transform, count, size

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=generator)
        return self.transform(Image.fromarray(pixels.to(torch.uint8).numpy())), index % 2


def test_pairs_are_a_function_of_seed_epoch_and_index():
    pairs = RobustDataset(_Images(BarlowTwinsPair(32)), seed=3)
    first, label = pairs[(1, 2)]
    assert first.shape == (2, 3, 32, 32) and label == 0
    torch.testing.assert_close(pairs[(1, 2)][0], first, rtol=0, atol=0)  # same key, same pair
    assert not torch.equal(first[0], first[1])  # the two views differ
    assert not torch.equal(pairs[(2, 2)][0], first)  # another epoch
    assert not torch.equal(RobustDataset(_Images(BarlowTwinsPair(32)), seed=4)[(1, 2)][0], first)


@pytest.mark.parametrize("view_index, blur_p, solarize_p", [(0, 1.0, 0.0), (1, 0.1, 0.2)])
def test_view_probabilities_are_respected(view_index, blur_p, solarize_p):
    view = BarlowTwinsPair(32).views[view_index]
    torch.manual_seed(view_index)
    draws = [view.draw(48, 40) for _ in range(3000)]

    def rate(test):
        return sum(map(test, draws)) / len(draws)

    # 5 standard deviations of a 3000-draw binomial are at most 0.046
    assert rate(lambda d: d["flip"]) == pytest.approx(0.5, abs=0.046)
    assert rate(lambda d: d["jitter"] is not None) == pytest.approx(0.8, abs=0.04)
    assert rate(lambda d: d["grayscale"]) == pytest.approx(0.2, abs=0.037)
    assert rate(lambda d: d["blur_sigma"] is not None) == pytest.approx(blur_p, abs=0.03)
    assert rate(lambda d: d["solarize"]) == pytest.approx(solarize_p, abs=0.037)
    sigmas = [d["blur_sigma"] for d in draws if d["blur_sigma"] is not None]
    assert 0.1 * 32 / 224 <= min(sigmas) and max(sigmas) <= 2.0 * 32 / 224
    brightness = [d["jitter"][1][0] for d in draws if d["jitter"] is not None]
    assert 0.6 <= min(brightness) < 0.65 and 1.35 < max(brightness) <= 1.4
    scales = [d["box"][2] * d["box"][3] / (48 * 40) for d in draws]
    assert 0.06 <= min(scales) < 0.1 and max(scales) > 0.9  # boxes are whole pixels


def test_view_decisions_change_the_pixels_as_named():
    view = BarlowTwinsView(16, 0.0, 0.0, normalize=False)
    plain = {"box": (0, 0, 16, 16), "flip": False, "jitter": None, "grayscale": False}
    plain.update(blur_sigma=None, solarize=False)
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    assert view.apply(white, plain).min() == 1.0
    assert view.apply(white, {**plain, "solarize": True}).max() == 0.0
    coloured = Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy())
    gray = view.apply(coloured, {**plain, "grayscale": True})
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    blurred = view.apply(coloured, {**plain, "blur_sigma": 1.0})
    assert blurred.std() < 0.8 * view.apply(coloured, plain).std()
    flipped = view.apply(coloured, {**plain, "flip": True})
    torch.testing.assert_close(flipped, view.apply(coloured, plain).flip(-1))


def _separable_batches(count, generator):
    """(images, labels, []) batches: class c raises the mean of colour channel c by 2."""
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 3, (16,), generator=generator)
        images = torch.randn(16, 3, 6, 6, generator=generator)
        images[torch.arange(16), labels] += 2.0
        batches.append((images, labels, []))
    return batches


def test_probe_leaves_the_frozen_backbone_unchanged_and_learns():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    backbone = _conv_backbone()
    backbone(torch.randn(32, 3, 6, 6))  # non-trivial running statistics
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train, val = _separable_batches(12, generator), _separable_batches(4, generator)
    config = ProbeConfig(epochs=3, lr=0.5)
    metrics = run_linear_probe(backbone, 8, 3, train, val, None, torch.device("cpu"), config)
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert metrics["samples"] == 64 and metrics["top5"] == 100.0  # 3 classes: top-5 is all
    assert metrics["top1"] > 60.0, metrics  # chance is 33%

    quirky = ProbeConfig.tvlars_compatible(epochs=1)
    assert quirky.weight_decay == 5e-4 and quirky.random_val_crops
    run_linear_probe(backbone, 8, 3, train, val, None, torch.device("cpu"), quirky)
    assert not torch.equal(backbone.state_dict()["1.running_mean"], before["1.running_mean"])


def test_probe_metrics_count_the_whole_set():
    probe, _, _ = build_probe(nn.Identity(), 3, 3, ProbeConfig())
    with torch.no_grad():
        probe.head.weight.copy_(torch.eye(3))
        probe.head.bias.zero_()
    features = torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 2, 3], [3, 1, 2], [2, 3, 1]])
    labels = torch.tensor([0, 2, 1, 1, 1])
    loader = [(features[:3], labels[:3], []), (None, None, ["bad"]), (features[3:], labels[3:])]
    metrics = evaluate_probe(probe, loader, None, torch.device("cpu"))
    # argmax 0, 1, 2, 0, 1: rows 0 and 4 are right; the unreadable batch counts nothing
    assert metrics["samples"] == 5 and metrics["top1"] == pytest.approx(40.0)
    assert metrics["top5"] == 100.0  # capped at the 3 classes


def reference_knn(queries, bank, labels, classes, k, temperature):
    """Weighted k-NN vote (Wu et al. 2018) in float64 loops."""
    predictions = []
    for q in queries.tolist():
        sims = [sum(a * b for a, b in zip(q, f)) for f in bank.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        scores = [0.0] * classes
        for i in nearest:
            scores[int(labels[i])] += math.exp(sims[i] / temperature)
        predictions.append(max(range(classes), key=scores.__getitem__))
    return predictions


def test_weighted_knn_matches_a_float64_loop():
    torch.manual_seed(0)
    bank = nn.functional.normalize(torch.randn(40, 6, dtype=torch.float64), dim=1)
    queries = nn.functional.normalize(torch.randn(9, 6, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (40,))
    for k, temperature in itertools.product((1, 5, 200), (0.07, 0.5)):
        got = weighted_knn_predict(queries, bank, labels, 4, k, temperature, chunk=4)
        assert got.tolist() == reference_knn(queries, bank, labels, 4, k, temperature)


def test_knn_monitor_separates_separable_features():
    generator = torch.Generator().manual_seed(1)
    channel_means = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bank, queries = _separable_batches(4, generator), _separable_batches(2, generator)
    result = knn_top1(channel_means, bank, queries, 3, None, torch.device("cpu"), k=20)
    assert result["samples"] == 32 and result["bank"] == 64
    assert result["top1"] > 60.0, result  # chance is 33%


def test_parts_plug_into_the_trainers_step_unchanged():
    """BarlowTwins, its criterion and meter, the recipe's groups, LARS and a closed-form
    cosine schedule through lars.step.optimizer_step as the trainer calls it."""
    from lars.distributed import LocalBackend
    from lars.schedules import build_scheduler
    from lars.step import StepContext, optimizer_step
    from lars.tasks.barlowtwins import BarlowTwinsCriterion, SSLMeter, bt_param_groups

    torch.manual_seed(0)
    model = BarlowTwins(_conv_backbone(), 8, [16, 16])
    weight_lr, norm_lr = 0.2 * 16 / 256, 0.0048 * 16 / 256
    groups = bt_param_groups(model, weight_lr, norm_lr, 1.5e-6)
    assert [(g["lr"], g["weight_decay"], g["layer_adaptation"]) for g in groups] == [
        (weight_lr, 1.5e-6, True),
        (norm_lr, 0.0, False),
    ]
    optimizer = LARS(groups, lr=weight_lr)
    scheduler = build_scheduler(
        optimizer, schedule="cosine", total_steps=3, warmup_steps=1, end_lr=0.001 * weight_lr
    )
    criterion = BarlowTwinsCriterion(lambd=0.0051)
    ctx = StepContext(
        model, criterion, optimizer, scheduler, LocalBackend(), torch.device("cpu"), 1
    )
    meter = SSLMeter(criterion, "cpu")
    pairs = [(torch.randn(16, 2, 3, 6, 6), torch.zeros(16, dtype=torch.long), [])] * 3
    before = [p.detach().clone() for p in model.parameters()]
    batches = iter(pairs)
    assert all(optimizer_step(ctx, batches, meter, []) for _ in range(3))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logged = meter.read_and_reset(LocalBackend())
    assert logged["loss"] == pytest.approx(logged["on_diag"] + 0.0051 * logged["off_diag"])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [0.001 * weight_lr, 0.001 * norm_lr]
    )


@pytest.mark.slow
def test_pretraining_then_probe_on_the_sample_set(sample_root, capsys):
    """The parts end to end on the bundled digits (10 classes, chance 10%): seeded pairs through
    RobustDataset, one epoch of LARS through optimizer_step, the k-NN monitor, a short probe.
    It checks the plumbing and that the features did not collapse (a collapse scores ~10%); the
    sample set is too easy to show what pre-training adds (random features already score well).
    The figures are printed and quoted in docs/barlowtwins.md."""
    import torchvision
    from torch.utils.data import DataLoader

    from lars.data.loaders import EpochTaggedSampler, collate_skipping_bad
    from lars.distributed import LocalBackend
    from lars.schedules import build_scheduler
    from lars.step import StepContext, optimizer_step
    from lars.tasks.barlowtwins import BarlowTwinsCriterion, SSLMeter, bt_param_groups
    from lars.tasks.linear_probe import probe_transforms

    torch.manual_seed(0)
    train_dir, val_dir = os.path.join(sample_root, "train"), os.path.join(sample_root, "val")
    pairs = RobustDataset(
        torchvision.datasets.ImageFolder(train_dir, transform=BarlowTwinsPair(32)), seed=0
    )
    sampler = EpochTaggedSampler(pairs, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(
        pairs, batch_size=128, sampler=sampler, drop_last=True, collate_fn=collate_skipping_bad
    )
    model = build_barlow_twins("tinycnn", "512-512")
    weight_lr, epochs = 0.2 * 128 / 256, 1
    optimizer = LARS(bt_param_groups(model, weight_lr, 0.0048 * 128 / 256, 1.5e-6), lr=weight_lr)
    steps = epochs * len(loader)
    scheduler = build_scheduler(
        optimizer, schedule="cosine", total_steps=steps, warmup_steps=2, end_lr=0.001 * weight_lr
    )
    criterion = BarlowTwinsCriterion()
    dist, cpu = LocalBackend(), torch.device("cpu")
    ctx = StepContext(model, criterion, optimizer, scheduler, dist, cpu, 1)
    meter, losses = SSLMeter(criterion, cpu), []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(len(loader)):
            assert optimizer_step(ctx, batches, meter, [])
            losses.append(meter.read_and_reset(dist)["loss"])
    config = ProbeConfig(epochs=6)
    probe_train, probe_val = probe_transforms(32, config)
    folder = torchvision.datasets.ImageFolder

    def plain_loader(root, transform, shuffle=False, batch_size=256):  # sorted by class
        return DataLoader(folder(root, transform=transform), batch_size, shuffle=shuffle)

    bank, val = plain_loader(train_dir, probe_val), plain_loader(val_dir, probe_val)
    knn = knn_top1(model.backbone, bank, val, 10, dist, cpu, k=20)
    probe_loader = plain_loader(train_dir, probe_train, shuffle=True, batch_size=64)
    probe = run_linear_probe(
        model.backbone, model.feature_width, 10, probe_loader, val, dist, cpu, config
    )
    with capsys.disabled():
        print(
            f"\nBT sample set: loss {losses[0]:.1f} -> {losses[-1]:.1f} in {steps} steps; "
            f"k-NN top-1 {knn['top1']:.1f}%; probe top-1 {probe['top1']:.1f}% "
            f"top-5 {probe['top5']:.1f}% ({probe['samples']} images)"
        )
    assert all(math.isfinite(loss) for loss in losses)
    assert knn["top1"] > 50.0 and probe["top1"] > 30.0  # chance: 10%; a collapse gives ~10%
