"""An example reward plugin for omnigrpo (see docs/rewards.md, "Write your own reward").

Two shapes a plugin can take:
- a reward function ``(images, prompts, metadata) -> list[float | None]``;
- a factory that does its expensive set-up once (here: building a palette) and returns one.

Use them from a config as ``vivid:saturation`` and ``vivid:PaletteMatch`` with this folder on
``PYTHONPATH`` (or install your module as a package, or register it under the ``omnigrpo.rewards``
entry-point group).
"""

import numpy as np


def saturation(images, prompts, metadata):
    """Mean HSV-style saturation of each image, in [0, 1]: rewards vivid colour over grey."""
    out = []
    for image in images:
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        high, low = rgb.max(-1), rgb.min(-1)
        out.append(float(np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0).mean()))
    return out


class PaletteMatch:
    """Factory: share of foreground pixels within ``tolerance`` of the colour the prompt names.

    Built once per reward worker with the config's ``kwargs``; returns ``None`` (not applicable) for
    prompts that name none of its colours.
    """

    COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 235), "yellow": (235, 215, 40)}

    def __init__(self, tolerance: float = 60.0):
        self.tolerance = tolerance
        self.palette = {name: np.array(rgb, np.float32) for name, rgb in self.COLOURS.items()}

    def __call__(self, images, prompts, metadata):
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            wanted = [c for c in self.palette if c in prompt.lower().split()]
            if not wanted:
                out.append(None)
                continue
            pixels = np.asarray(image, np.float32).reshape(-1, 3)
            foreground = pixels[np.linalg.norm(pixels - 16.0, axis=-1) > 60.0]
            if len(foreground) == 0:
                out.append(0.0)
                continue
            close = np.linalg.norm(foreground - self.palette[wanted[0]], axis=-1) < self.tolerance
            out.append(float(close.mean()))
        return out
