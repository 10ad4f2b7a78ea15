import numpy as np

from omnigrpo.rollout.families.codebook import PatchCodebook
from omnigrpo.worlds import shapes


def _fitted():
    _, images = shapes.sample_pairs(shapes.train_items(), 256, np.random.default_rng(0))
    return PatchCodebook.fit(images, 64, seed=0)


def test_encode_decode_shapes_and_fidelity():
    codebook = _fitted()
    _, images = shapes.sample_pairs(shapes.all_scenes(), 16, np.random.default_rng(1))
    codes = codebook.encode(images)
    assert codes.shape == (16, 64) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 64
    decoded = codebook.decode(codes)
    assert decoded.shape == (16, 32, 32, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - images).mean() < 6.0
    assert (codebook.encode(decoded) == codes).mean() > 0.95  # decoding then encoding is stable


def test_background_is_reproduced_exactly():
    codebook = _fitted()
    blank = np.empty((1, 32, 32, 3), np.uint8)
    blank[:] = shapes.BACKGROUND
    assert np.array_equal(codebook.decode(codebook.encode(blank)), blank)


def test_save_and_load_round_trip(tmp_path):
    codebook = _fitted()
    codebook.save(tmp_path)
    loaded = PatchCodebook.load(tmp_path)
    assert np.array_equal(loaded.centroids, codebook.centroids) and loaded.tokens_per_image == 64
