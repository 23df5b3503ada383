"""Stopping on a signal: SIGINT and SIGTERM end the current step, and the run saves before it stops."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a step; the checkpoint holds every episode trained."""

    def __init__(self, episodes_done: int, num_episodes: int, checkpoint: Path | None, is_main: bool):
        super().__init__(episodes_done)
        self.episodes_done, self.num_episodes, self.checkpoint, self.is_main = (
            episodes_done, num_episodes, checkpoint, is_main)

    def __str__(self) -> str:
        if self.checkpoint is None:
            return "interrupted before the first step: nothing to save"
        return (f"interrupted at episode {self.episodes_done} of {self.num_episodes}: saved {self.checkpoint} "
                "with every episode trained; continue with --resume")


class StopRequest:
    """While active, SIGINT and SIGTERM only ask the loop to stop after the current step. A second signal
    more than GRACE_S after the first aborts at once; closer ones are the same request (torchrun forwards
    the terminal's Ctrl-C to ranks that the terminal already reached)."""
    GRACE_S = 2.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested_at: float | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
        elif now - self.requested_at > self.GRACE_S:
            self.__exit__()
            raise KeyboardInterrupt

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python handles signals only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
