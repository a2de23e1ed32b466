from torchvision.transforms import InterpolationMode  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from torchvision import _placeholder

    return _placeholder(f"{__name__}.{name}")
