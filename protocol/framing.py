"""Newline-delimited framing: one JSON-RPC message (or batch) per line.

Like h11's ``max_incomplete_event_size``, the splitter never buffers more than
``max_size`` bytes of one message: an oversize frame is reported, not stored.
"""

from __future__ import annotations

from typing import Final

DEFAULT_MAX_FRAME: Final = 1 << 20  # 1 MiB
#: The most requests one batch line may hold (a longer batch is one -32600).
MAX_BATCH: Final = 100


class FrameSplitter:
    """Incremental splitter: ``feed(bytes)`` returns the complete lines seen so far.

    After a line longer than ``max_size`` (without its newline) ``oversize``
    becomes true, the lines before it are still returned, and every later
    ``feed`` returns nothing: the peer is out of step and must be disconnected.
    """

    __slots__ = ("_keep_spent", "_partial", "max_size", "oversize", "spent")

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME, keep_spent: bool = False) -> None:
        self.max_size = max_size
        self._partial = bytearray()
        self.oversize = False
        self._keep_spent = keep_spent
        #: With ``keep_spent``: the buffers the last ``feed`` made that its lines do not
        #: cover (a held partial joined to new data, a line before its "\r" was cut,
        #: the start of the next message, what an oversize frame dropped), so the
        #: caller can wipe them with the lines (they may carry a passphrase).
        self.spent: list[bytes] = []

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (0 between messages)."""
        return len(self._partial)

    def _spend(self, buf: bytes) -> None:
        if self._keep_spent:
            self.spent.append(buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return each complete non-blank line, without its newline."""
        self.spent.clear()
        if self.oversize:
            return []
        if self._partial:
            # One new object, no intermediate copy; the held part is zeroed in place.
            data = b"".join((self._partial, data))
            self.wipe()
            self._spend(data)
        *lines, rest = data.split(b"\n")
        self._spend(rest)
        frames: list[bytes] = []
        for i, line in enumerate(lines):
            if len(line) > self.max_size:
                self.oversize = True
                for dropped in lines[i:]:
                    self._spend(dropped)
                return frames
            if line.endswith(b"\r"):
                self._spend(line)
                line = line[:-1]
            if line.strip():
                frames.append(line)
        if len(rest) > self.max_size:
            self.oversize = True
        elif rest:
            self._partial += rest
        return frames

    def wipe(self) -> None:
        """Zero and drop the incomplete message held (it may carry a passphrase)."""
        self._partial[:] = bytes(len(self._partial))
        self._partial.clear()
