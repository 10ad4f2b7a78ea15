"""A judge that writes the id of the process that built it, to show where judges load."""
import os
from pathlib import Path


def located(path: str):
    Path(path).write_text(str(os.getpid()))

    def score(images, prompts, metadata):
        return [0.5] * len(images)

    return score
