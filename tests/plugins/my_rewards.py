"""Reward functions and a factory for the reward worker's tests: good, failing, short, NaN, async."""
import math


def constant(images, prompts, metadata, value=0.5):
    return [value] * len(images)

def boom(images, prompts, metadata):
    raise RuntimeError("judge is down")

def short(images, prompts, metadata):
    return [1.0] * (len(images) - 1)

def nan_first(images, prompts, metadata):
    return [math.nan] + [1.0] * (len(images) - 1)

def text_only(images, prompts, metadata):
    return [1.0 if m.get("text") else None for m in metadata]

async def async_half(images, prompts, metadata):
    return [0.5] * len(images)

class Brightness:
    """A factory: built once with kwargs, then called per batch."""
    def __init__(self, scale=1.0):
        self.scale = scale
    def __call__(self, images, prompts, metadata):
        return [self.scale * float(im.mean()) / 255 for im in images]


def overflowing(images, prompts, metadata):
    """Finite in Python, but the second and third overflow float32 (where the learner computes); the fourth fits."""
    return [1.0, 1e39, 10**400, 3.0e38][: len(images)]


def lost_after_start(images, prompts, metadata):
    """Passes its dry run on blank images, then fails every real batch (a judge whose backend went away)."""
    if images.any():
        raise RuntimeError("judge backend lost")
    return [0.0] * len(images)


def stuck_in_dry_run(marker: str = ""):
    """A judge that hangs on the blank images of its start-up dry run (waiting on a backend that never answers),
    writing ``marker`` first."""
    import time
    from pathlib import Path

    def score(images, prompts, metadata):
        if not images.any():
            if marker:
                Path(marker).write_text("stuck")
            time.sleep(3600)
        return [0.0] * len(images)

    return score
