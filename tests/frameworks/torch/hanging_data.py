"""``--data-fn`` batches for ``test_distributed.py``: rank 1 never delivers its first batch (a hung reader)."""

import os
import threading

import numpy as np


class Loader:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.data = [rng.normal(size=(8, 3, 32, 32)).astype(np.float32) for _ in range(4)]

    def __iter__(self):
        if os.environ.get("RANK") == "1":
            threading.Event().wait()  # forever; torchrun ends it when rank 0 gives up
        return iter(self.data)


def batches() -> Loader:
    return Loader()
