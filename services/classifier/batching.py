"""Dynamic batching: gather crops across messages and streams into one model call.

A batch runs as soon as it is full (``max_batch`` crops) or as soon as its oldest crop
has waited ``max_wait_ms`` -- the same two knobs as Triton's dynamic batcher
(``max_queue_delay_microseconds``) and TF Serving's ``batch_timeout_micros``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from services.common.protocol import Faces


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_wait_ms: float = 5.0


@dataclass
class PendingFaces:
    header: Faces
    crops: np.ndarray  # (N, S, S, 3) uint8
    arrived: float  # monotonic seconds


class Batcher:
    """A FIFO of faces messages that hands out batches according to a BatchPolicy."""

    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self.queue: deque[PendingFaces] = deque()
        self.crops = 0

    def __len__(self) -> int:
        return len(self.queue)

    def add(self, item: PendingFaces) -> None:
        self.queue.append(item)
        self.crops += len(item.crops)

    def replace_older(self, item: PendingFaces) -> bool:
        """Put ``item`` in the place of a waiting message of the same stream, keeping that
        one's place and arrival time; False (nothing done) when the stream has none waiting.

        For live streams: a classifier that falls behind then works on each stream's newest
        frame instead of a queue of frames that go stale before their turn (the detector's
        own policy), and its output drops to its capacity instead of to nothing."""
        for i, waiting in enumerate(self.queue):
            if waiting.header.stream == item.header.stream:
                self.crops += len(item.crops) - len(waiting.crops)
                self.queue[i] = PendingFaces(item.header, item.crops, waiting.arrived)
                return True
        return False

    def ready(self, now: float) -> bool:
        if not self.queue:
            return False
        if self.crops >= self.policy.max_batch:
            return True
        return (now - self.queue[0].arrived) * 1000.0 >= self.policy.max_wait_ms

    def wait_ms(self, now: float) -> float | None:
        """How long the caller may block before the oldest message is due (None: no work)."""
        if not self.queue:
            return None
        if self.crops >= self.policy.max_batch:
            return 0.0
        return max(0.0, self.policy.max_wait_ms - (now - self.queue[0].arrived) * 1000.0)

    def take(self) -> list[PendingFaces]:
        """Whole messages, oldest first, up to max_batch crops (always at least one message)."""
        batch = [self.queue.popleft()]
        total = len(batch[0].crops)
        while self.queue and total + len(self.queue[0].crops) <= self.policy.max_batch:
            item = self.queue.popleft()
            total += len(item.crops)
            batch.append(item)
        self.crops -= total
        return batch
