"""Rewards that return what is not a real number (each counts as failed, never coerced), one that exits when
called, and an attribute that is not callable."""
import sys

import numpy as np

CONSTANT = 3


def bools(images, prompts, metadata):
    return [True] * len(images)


def numpy_bools(images, prompts, metadata):
    return list(np.ones(len(images), dtype=bool))


def complexes(images, prompts, metadata):
    return [1 + 0j] * len(images)


def numpy_complexes(images, prompts, metadata):
    return list(np.ones(len(images), dtype=np.complex128))


def strings(images, prompts, metadata):
    return ["1.0"] * len(images)


def exits(images, prompts, metadata):
    sys.exit(3)
