"""torchvision ResNet weights through the name mapping give our backbone the same features."""
import unittest

import torch
import torchvision
from torch import nn

from codetr.checkpoint import convert_torchvision_resnet, torchvision_resnet_key
from codetr.modeling.backbone import build_resnet


def _randomize_batch_norms(model: nn.Module) -> None:
    """Random BatchNorm parameters and statistics (the defaults make BN the identity); the
    convolutions keep torchvision's random initialisation."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, low in ((module.weight, 0.5), (module.running_var, 0.5)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + low)
                for tensor in (module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


def _torchvision_features(model: torchvision.models.ResNet, images: torch.Tensor):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    features = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        features.append(x)
    return features


class TestTorchvisionResNet(unittest.TestCase):
    def test_key_names(self):
        self.assertEqual(torchvision_resnet_key("conv1.weight"), "stem.conv1.weight")
        self.assertEqual(torchvision_resnet_key("bn1.running_var"), "stem.conv1.norm.running_var")
        self.assertEqual(
            torchvision_resnet_key("layer3.5.bn3.bias"), "res4.5.conv3.norm.bias"
        )
        self.assertEqual(
            torchvision_resnet_key("layer1.0.downsample.0.weight"), "res2.0.shortcut.weight"
        )
        self.assertIsNone(torchvision_resnet_key("fc.weight"))
        self.assertIsNone(torchvision_resnet_key("layer5.0.conv1.weight"))

    def test_unknown_keys_raise(self):
        with self.assertRaisesRegex(ValueError, "head.weight"):
            convert_torchvision_resnet({"head.weight": torch.zeros(1)})

    def test_same_features(self):
        for depth in (18, 50):
            with self.subTest(depth=depth):
                reference = getattr(torchvision.models, f"resnet{depth}")().eval()
                _randomize_batch_norms(reference)
                converted = convert_torchvision_resnet(reference.state_dict(), prefix="")
                self.assertFalse(any(k.startswith("fc.") for k in converted))

                ours = build_resnet(depth=depth).eval()  # FrozenBN, stem + res2 frozen
                ours.load_state_dict(converted, strict=True)
                images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    expected = _torchvision_features(reference, images)
                    actual = ours(images)
                for name, theirs in zip(["res2", "res3", "res4", "res5"], expected):
                    torch.testing.assert_close(actual[name], theirs, rtol=1e-4, atol=1e-4)

    def test_prefix(self):
        converted = convert_torchvision_resnet(torchvision.models.resnet18().state_dict())
        self.assertIn("backbone.res5.1.conv2.norm.running_mean", converted)
        self.assertTrue(all(k.startswith("backbone.") for k in converted))
