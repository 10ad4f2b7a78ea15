"""A reward for family tests: refuses images of the wrong size (a failed reward is counted, never scored 0),
otherwise scores colour saturation, which differs between random samples (so groups carry signal)."""

import numpy as np


class SizedSaturation:
    def __init__(self, height: int, width: int):
        self.shape = (height, width, 3)

    def __call__(self, images, prompts, metadata):
        out = []
        for image in images:
            if np.asarray(image).shape != self.shape:
                raise ValueError(f"image of shape {np.asarray(image).shape}, expected {self.shape}")
            rgb = np.asarray(image, np.float32) / 255.0
            high, low = rgb.max(-1), rgb.min(-1)
            out.append(float(np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0).mean()))
        return out
