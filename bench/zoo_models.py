"""Real architectures for the zoo, built from their own packages with random weights (nothing is downloaded).

``torch_model`` is what the zoo's state_dicts name with ``--arch bench/zoo_models.py:torch_model --arch-kwargs
'{"name": ...}'``, as a user names the code that builds their network.
"""

from __future__ import annotations

TORCH_SIZES = {"inception_v3": 96, "r3d_18": 32}
"""Input side per model where the default (64) does not fit; r3d_18 takes clips of 8 frames."""
TORCH_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                "inception_v3", "shufflenet_v2_x0_5", "regnet_y_400mf", "r3d_18", "resnet18_frozen_bn",
                "resnet18_sync_bn", "timm_resnet18", "timm_efficientnet_b0", "timm_mobilenetv3_small_100",
                "timm_rexnet_100", "audio_conv1d"]
TORCH_FOLD_EXTRAS = ["hf_resnet50", "flagged_forward", "composed_fold"]
"""fold / export only (``zoo_deploy``): a Hugging Face ResNet built from its config (its embeddings branch on
the input's shape, which torch.fx cannot trace), a module with a Python flag in ``forward``, and a BN folded
forward into the 1x1 conv that also takes a BN folded backward"""
ONNX_MODELS = ["resnet18_legacy13", "resnet18_legacy17", "resnet18_dynamo18"]
"""fold / export only: torchvision's resnet18 as torch's legacy exporter (opsets 13, 17) and its dynamo exporter
(opset 18, onnxscript) write it, BatchNormalization nodes kept"""
KERAS_MODELS = ["MobileNetV2", "MobileNetV3Small", "ResNet50", "EfficientNetB0", "DenseNet121", "Xception",
                "InceptionV3", "NASNetMobile", "masked_sequence", "MobileNetV2_savedmodel"]


def torch_input_shape(name: str) -> tuple[int, ...]:
    if name == "audio_conv1d":
        return (1, 4000)
    if name == "composed_fold":
        return (1, 64)
    if name == "r3d_18":
        return (3, 8, 32, 32)
    side = TORCH_SIZES.get(name, 64)
    return (3, side, side)


def torch_model(name: str):
    """The named architecture, random weights, in eval(); the same name and seed give the same weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name in TORCH_FOLD_EXTRAS:
        return _fold_extra(name).eval()
    if name.startswith("timm_"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10).eval()
    if name == "audio_conv1d":
        return nn.Sequential(nn.Conv1d(1, 16, 9, stride=4), nn.BatchNorm1d(16), nn.ReLU(),
                             nn.Conv1d(16, 32, 9, stride=4), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                             nn.Conv1d(32, 32, 5, stride=2), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    import torchvision

    if name == "r3d_18":
        return torchvision.models.video.r3d_18(weights=None, num_classes=10).eval()
    if name == "resnet18_frozen_bn":
        from torchvision.ops.misc import FrozenBatchNorm2d

        return torchvision.models.resnet18(weights=None, num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    if name == "resnet18_sync_bn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    options = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **options).eval()


def _fold_extra(name: str):
    import torch
    from torch import nn

    if name == "hf_resnet50":
        import transformers

        return transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=10))

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3),
                                          nn.BatchNorm2d(32), nn.ReLU())
            self.head = nn.Linear(32, 10)

        def forward(self, x, embed=False):
            x = self.features(x).mean((2, 3))
            return x if embed else self.head(x)

    class Composed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pre = nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8)
            self.mix, self.bn_mix = nn.Conv1d(8, 16, 1), nn.BatchNorm1d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.mix(self.pre(torch.relu(self.conv(x))))
            return self.fc(torch.relu(self.bn_mix(x)).mean(2))

    return Flagged() if name == "flagged_forward" else Composed()


def keras_input_shape(name: str) -> tuple[int, ...]:
    return (12, 6) if name == "masked_sequence" else (96, 96, 3)


def keras_model(name: str, side: int = 96):
    """A keras.applications model, or ``masked_sequence``: padded sequences whose padding Masking turns into a
    mask, which Keras's BN leaves out of its statistics."""
    import keras

    keras.utils.set_random_seed(0)
    if name == "masked_sequence":
        inputs = keras.Input(keras_input_shape(name))
        x = keras.layers.BatchNormalization()(keras.layers.Dense(16)(keras.layers.Masking(0.0)(inputs)))
        x = keras.layers.BatchNormalization()(keras.layers.Dense(8, activation="relu")(x))
        return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(x)), name=name)
    build = getattr(keras.applications, name)
    return build(weights=None, input_shape=(side, side, 3), classes=10)
