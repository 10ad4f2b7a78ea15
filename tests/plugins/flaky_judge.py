"""A judge whose first score of every batch is NaN: a failure the worker must count, never score 0."""
import math


def first_is_nan(images, prompts, metadata):
    """A judge that fails on the first sample of every batch."""
    return [math.nan] + [0.5] * (len(images) - 1)
