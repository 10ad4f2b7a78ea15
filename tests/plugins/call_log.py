"""A reward for the reward service's tests: appends one JSON line per judge call to a file (the call's size,
the replica that made it, and the threads that built and called it), so a test sees how requests were batched
across replicas, and can be made slow to show replicas working side by side."""
import json
import threading
import time


class CallLog:
    def __init__(self, path: str, seconds: float = 0.0, replica: str = "", fail: str = "-"):
        if replica == fail:
            raise RuntimeError(f"no GPU left for replica {replica}")
        self.path, self.seconds, self.replica = path, seconds, replica
        self.built_in = threading.current_thread().name

    def __call__(self, images, prompts, metadata):
        start = time.time()
        time.sleep(self.seconds)
        with open(self.path, "a") as f:  # one short append per call: lines do not interleave
            f.write(json.dumps({"size": len(images), "replica": self.replica, "built_in": self.built_in,
                                "called_in": threading.current_thread().name, "start": start,
                                "end": time.time()}) + "\n")
        return [float(len(p)) for p in prompts]


def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]
