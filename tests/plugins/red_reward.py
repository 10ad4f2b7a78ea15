"""A reward the tiny shapes policy can learn fast: the share of red pixels."""
import numpy as np


def redness(images, prompts, metadata):
    """Share of pixels that are the world's red: an easy target, so learning is visible fast."""
    red = np.array([220, 40, 40])
    return [float((np.abs(im.astype(int) - red).sum(-1) < 60).mean()) for im in images]


def not_red(images, prompts, metadata):
    """One minus :func:`redness`: a watchdog that disagrees with the training reward by construction."""
    return [1.0 - r for r in redness(images, prompts, metadata)]
