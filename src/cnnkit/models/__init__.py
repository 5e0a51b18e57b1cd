"""The architecture zoo; importing it registers every family's builders."""

from cnnkit.models import efficientnet, heads, inception, mobilenet, resnet, unet, vgg, yolo
from cnnkit.models.base import ClassifierHead, ConvNet, FeatureExtractor, FeatureInfo

__all__ = [
    "ClassifierHead",
    "ConvNet",
    "FeatureExtractor",
    "FeatureInfo",
    "efficientnet",
    "heads",
    "inception",
    "mobilenet",
    "resnet",
    "unet",
    "vgg",
    "yolo",
]
