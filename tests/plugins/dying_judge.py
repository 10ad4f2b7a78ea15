"""A judge that kills its own reward actor on its third call inside Ray."""
import os

CALLS = {"n": 0}

def dies_on_second_batch(images, prompts, metadata):
    """Kills its own process (the reward actor) on its second call inside Ray."""
    in_actor = os.environ.get("OMNIGRPO_TEST_IN_RAY") and os.getpid() != int(os.environ["OMNIGRPO_TEST_DRIVER_PID"])
    if in_actor and images.any():  # the actor's dry run on blank images is not counted
        CALLS["n"] += 1
        if CALLS["n"] == 3:  # call 1: step-0 evaluation, call 2: step 1, call 3: step 2
            os._exit(1)
    return [0.5] * len(images)
