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
