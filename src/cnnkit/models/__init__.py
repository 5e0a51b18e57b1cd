"""The architecture zoo; importing it registers every family's builders."""

from cnnkit.models import efficientnet, inception, mobilenet, resnet, unet, vgg
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureExtractor, FeatureInfo

__all__ = [
    "ClassifierHead",
    "ConvNet",
    "FeatureExtractor",
    "FeatureInfo",
    "efficientnet",
    "inception",
    "mobilenet",
    "resnet",
    "unet",
    "vgg",
]
