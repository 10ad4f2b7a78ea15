"""A judge whose first real call hangs (a stuck judge), not the blank dry run: ``marker`` records that it did."""
import time
from pathlib import Path


def hangs_once(marker: str):
    def score(images, prompts, metadata):
        if not Path(marker).exists() and images.any():
            Path(marker).write_text("hung")
            time.sleep(3600)
        return [float(im.mean()) / 255.0 for im in images]

    return score
