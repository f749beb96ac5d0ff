"""Real photographs that ship inside scikit-image, as an offline image source for demos and
tests (no download needed)."""

from __future__ import annotations

from typing import Any

from vlrm import hookimpl
from vlrm.data import ImageFolder
from vlrm.errors import ConfigError

# Colour photographs and scans bundled with scikit-image (the pooch-fetched ones are absent
# offline, so only files inside the package are listed).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "color.png", "ihc.png",
          "camera.png", "moon.png", "coins.png", "page.png", "horse.png", "brick.png")


def bundled_photos() -> ImageFolder:
    """The photos bundled with scikit-image (about 16 files, colour and grayscale)."""
    try:
        import skimage.data
    except ModuleNotFoundError as exc:
        raise ConfigError("data: bundled_photos needs scikit-image: pip install 'vlrm[test]'") from exc
    from pathlib import Path

    root = Path(skimage.data.__file__).parent
    return ImageFolder(str(root), patterns=PHOTOS)


@hookimpl
def vlrm_register_datasets() -> dict[str, Any]:
    return {"image_folder": ImageFolder, "bundled_photos": bundled_photos}
