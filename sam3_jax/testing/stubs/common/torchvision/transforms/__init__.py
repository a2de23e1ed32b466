"""InterpolationMode is real (timm builds tables from it at import); the rest are placeholders."""
from enum import Enum


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from torchvision import _placeholder

    return _placeholder(f"{__name__}.{name}")
