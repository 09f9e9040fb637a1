"""param_groups: normalisation layers by module type, biases by registered name, no duplicates."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from lars.param_groups import param_group_counts, param_group_summary, param_groups


def _ids(group):
    return [id(p) for p in group["params"]]


@pytest.fixture(scope="module")
def resnet50():
    return torchvision.models.resnet50()


def test_resnet50_split(resnet50):
    decayed, plain = param_groups(resnet50, weight_decay=5e-5)
    assert (decayed["weight_decay"], decayed["layer_adaptation"]) == (5e-5, True)
    assert (plain["weight_decay"], plain["layer_adaptation"]) == (0.0, False)
    decayed_ids, plain_ids = set(_ids(decayed)), set(_ids(plain))

    named = dict(resnet50.named_parameters())
    # The shortcut's BatchNorm is named downsample.1: a name rule looking for "bn" misses it.
    assert id(named["layer1.0.downsample.1.weight"]) in plain_ids
    assert id(named["layer1.0.downsample.1.bias"]) in plain_ids
    assert id(named["layer1.0.downsample.0.weight"]) in decayed_ids  # the shortcut's conv
    for module in resnet50.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert {id(module.weight), id(module.bias)} <= plain_ids
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert id(module.weight) in decayed_ids
    assert id(resnet50.fc.bias) in plain_ids

    # ResNet-50: 53 convolutions and 1 linear weight; 53 BatchNorms x 2 and the fc bias.
    assert param_group_counts([decayed, plain])[0][0] == 54
    assert len(plain_ids) == 53 * 2 + 1
    all_params = list(resnet50.parameters())
    assert len(decayed["params"]) + len(plain["params"]) == len(all_params) == 161
    assert len(decayed_ids | plain_ids) == 161  # no tensor twice, within or across groups
    total = sum(p.numel() for p in decayed["params"]) + sum(p.numel() for p in plain["params"])
    assert total == sum(p.numel() for p in all_params) == 25_557_032


def test_groups_hold_only_scalar_options(resnet50):
    for group in param_groups(resnet50, weight_decay=1e-4):
        assert set(group) == {"params", "weight_decay", "layer_adaptation"}
        for key, value in group.items():
            if key != "params":
                assert type(value) in (float, int, bool), (key, value)


class Mixed(nn.Module):
    """GroupNorm, LayerNorm, RMSNorm, a tied weight, and names chosen to fool name rules."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.norm_free = nn.Linear(8, 8, bias=False)
        self.bn = nn.Linear(8, 8)  # called "bn" but a linear layer: its weight is decayed
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two owners
        self.ln_again = self.ln  # one module reachable under two names
        self.pos_bias = nn.Parameter(torch.zeros(8))  # not named "bias", but a vector
        self.pos_embedding = nn.Parameter(torch.zeros(1, 4, 8))  # a table, by its name
        self.rms = nn.RMSNorm(8) if hasattr(nn, "RMSNorm") else nn.LayerNorm(8)


def test_groupnorm_layernorm_and_tied_parameters():
    model = Mixed()
    decayed, plain = param_groups(model, weight_decay=0.1)
    expected_decayed = [
        model.embed.weight,
        model.conv.weight,
        model.norm_free.weight,
        model.bn.weight,
    ]
    expected_plain = [
        model.conv.bias,
        model.gn.weight,
        model.gn.bias,
        model.ln.weight,
        model.ln.bias,
        model.bn.bias,
        model.pos_bias,
        model.pos_embedding,
        *model.rms.parameters(),
    ]
    assert sorted(_ids(decayed)) == sorted(map(id, expected_decayed))
    assert sorted(_ids(plain)) == sorted(map(id, expected_plain))
    assert _ids(decayed).count(id(model.head.weight)) == 1


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    decayed, plain = param_groups(model, weight_decay=1e-4)
    assert _ids(decayed) == [id(model[2].weight)]
    assert _ids(plain) == [id(model[0].bias), id(model[1].weight), id(model[2].bias)]


def test_empty_groups_are_dropped():
    groups = param_groups(nn.Linear(3, 3, bias=False), weight_decay=1e-4)
    assert len(groups) == 1 and groups[0]["layer_adaptation"] is True
    groups = param_groups(nn.BatchNorm2d(3), weight_decay=1e-4)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert param_groups(nn.ReLU(), weight_decay=1e-4) == []


def test_groups_work_with_a_torch_optimizer():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=0.5), lr=0.1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]


def test_negative_weight_decay_is_rejected():
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), weight_decay=-1.0)


def test_summary_counts(capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # 108 + 4 | 4 + 4
    groups = param_groups(model, weight_decay=1e-4, verbose=True)
    printed = capsys.readouterr().out
    assert param_group_counts(groups) == [(1, 108), (3, 12)]
    summary = param_group_summary(model, groups)
    assert printed.strip() == summary
    assert "param group 0: 1 tensors, 108 parameters" in summary
    assert "param group 1: 3 tensors, 12 parameters" in summary
    assert "4 trainable tensors, 120 parameters; 4 tensors in the groups" in summary
    partial = param_group_summary(model, groups[:1])
    assert "1 tensors in the groups" in partial  # a parameter missing from the groups shows


TRANSFORMERS = {  # model -> {parameter name: kind} that must be excluded (beyond norms, biases)
    "vit_b_16": {
        "class_token": "token",
        "encoder.pos_embedding": "position embedding",
        "encoder.layers.encoder_layer_0.self_attention.in_proj_bias": "bias",
    },
    "swin_t": {"features.1.0.attn.relative_position_bias_table": "relative position table"},
    "convnext_tiny": {"features.1.0.layer_scale": "layer scale"},
    "resnet50": {"layer1.0.downsample.1.weight": "normalisation"},
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_torchvision_models_decay_only_their_weight_matrices(name):
    """In resnet50, vit_b_16, swin_t and convnext_tiny, exactly the convolution, linear and
    attention-projection weight matrices are decayed and adapted; every norm parameter, bias,
    token, position embedding, relative-position table and layer scale is excluded."""
    with torch.device("meta"):  # structure only: no memory, no initialisation
        model = getattr(torchvision.models, name)()
    decayed, plain = param_groups(model, weight_decay=0.05)
    expected_decayed = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            matrix = isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "weight"
            if matrix or pname == "in_proj_weight":
                assert p.ndim >= 2
                expected_decayed.add(id(p))
    all_ids = {id(p) for p in model.parameters()}
    assert set(_ids(decayed)) == expected_decayed
    assert set(_ids(plain)) == all_ids - expected_decayed
    named = dict(model.named_parameters())
    summary = param_group_summary(model, [decayed, plain])
    for pname, kind in TRANSFORMERS[name].items():
        assert id(named[pname]) in set(_ids(plain)), pname
        assert f"  {kind}: " in summary
    counts = {line.split(":")[0].strip(): int(line.split(":")[1].split()[0])
              for line in summary.splitlines() if line.startswith("  ")}  # fmt: skip
    assert sum(counts.values()) == len(plain["params"])


def test_summary_lists_kinds_with_first_names():
    model = Mixed()
    summary = param_group_summary(model, param_groups(model, weight_decay=0.1))
    lines = summary.splitlines()
    assert "  normalisation: " in summary and "  bias: 2 (conv.bias, bn.bias)" in lines
    assert "  ndim <= 1: 1 (pos_bias)" in lines
    assert "  position embedding: 1 (pos_embedding)" in lines
