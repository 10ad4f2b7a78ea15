"""A discrete image tokenizer for the built-in world: a k-means codebook over 4x4 RGB patches.

Why: the RL loop needs what real models have, an image turned into a short sequence of codes and
back, without any weights to download. k-means (scikit-learn's) over patches of synthetic scenes is
such a tokenizer, fitted in seconds: a 32x32 image becomes 8x8 = 64 codes in raster order (a 24x72
one 6x18 = 108), and decoding pastes each code's centroid patch back. It plays the role a VQ
decoder plays for Janus-Pro.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

PATCH = 4


class PatchCodebook:
    """``encode(images) -> codes`` and ``decode(codes) -> images`` over a fixed codebook.

    Args:
        centroids: float32 ``[K, PATCH * PATCH * 3]`` patch centroids in [0, 255].
        image_shape: (height, width) of the images, multiples of ``PATCH``.
    """

    def __init__(self, centroids: np.ndarray, image_shape: tuple[int, int] = (32, 32)):
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.grid = (self.image_shape[0] // PATCH, self.image_shape[1] // PATCH)

    @property
    def size(self) -> int:
        return len(self.centroids)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def fit(cls, images: np.ndarray, size: int, seed: int) -> PatchCodebook:
        """Fit ``size`` centroids on the patches of uint8 ``images`` ``[N, H, W, 3]``."""
        patches = cls._patches(images)
        # Duplicates dominate synthetic scenes (flat background): cluster the unique patches
        # weighted by how often they occur, which is exact k-means on all of them, only faster.
        unique, counts = np.unique(patches, axis=0, return_counts=True)
        km = KMeans(n_clusters=min(size, len(unique)), n_init=1, random_state=seed, max_iter=100)
        km.fit(unique, sample_weight=counts)
        centroids = km.cluster_centers_.astype(np.float32)
        if len(centroids) < size:  # fewer distinct patches than codes: pad with copies
            centroids = np.concatenate([centroids, np.repeat(centroids[:1], size - len(centroids), 0)])
        return cls(centroids, images.shape[1:3])

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> int64 codes ``[B, (H/4) * (W/4)]`` in raster order."""
        b = images.shape[0]
        patches = self._patches(images)
        # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2; the first term does not change the argmin
        dist = (self.centroids**2).sum(1)[None, :] - 2.0 * patches @ self.centroids.T
        return dist.argmin(1).reshape(b, -1).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes ``[B, T]`` -> uint8 images ``[B, H, W, 3]``."""
        codes = np.asarray(codes)
        b, (gh, gw) = codes.shape[0], self.grid
        patches = self.centroids[codes].reshape(b, gh, gw, PATCH, PATCH, 3)
        images = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * PATCH, gw * PATCH, 3)
        return np.clip(np.rint(images), 0, 255).astype(np.uint8)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        np.save(directory / "codebook.npy", self.centroids)
        (directory / "codebook.json").write_text(json.dumps({"image_shape": list(self.image_shape), "patch": PATCH}))

    @classmethod
    def load(cls, directory: str | Path) -> PatchCodebook:
        directory = Path(directory)
        meta = json.loads((directory / "codebook.json").read_text())
        return cls(np.load(directory / "codebook.npy"), tuple(meta["image_shape"]))

    @staticmethod
    def _patches(images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> float32 ``[B * (H/4) * (W/4), 48]`` in raster order."""
        b, h, w, c = images.shape
        x = images.astype(np.float32).reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, PATCH * PATCH * c)
