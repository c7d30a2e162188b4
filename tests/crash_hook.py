"""A simulated kill at a checkpoint's write boundary, shared by the trainers' crash tests.

clip.py (and qformer.py through it) call `CHECKPOINT_HOOK(path)`, flow_matching.py `FILE_WRITTEN(path)`,
after each file a save has made durable; the tests set that hook to `crash_after(n, written)`.
"""


class Crash(Exception):
    """What a kill at a write boundary looks like to the training loop."""


def crash_after(n, written):
    """A hook that records each file a save made durable and raises Crash after the n-th (never for n = 0)."""
    def hook(path):
        written.append(path)
        if len(written) == n:
            raise Crash(path)
    return hook
