"""Newline-delimited framing: one JSON-RPC message (or batch) per line.

Like h11's ``max_incomplete_event_size``, the splitter never buffers more than
``max_size`` bytes of one message: an oversize frame is reported, not stored.
"""

from __future__ import annotations

from typing import Final

DEFAULT_MAX_FRAME: Final = 1 << 20  # 1 MiB


class FrameSplitter:
    """Incremental splitter: ``feed(bytes)`` returns the complete lines seen so far.

    After a line longer than ``max_size`` (without its newline) ``oversize``
    becomes true, the lines before it are still returned, and every later
    ``feed`` returns nothing: the peer is out of step and must be disconnected.
    """

    __slots__ = ("_keep_joined", "_partial", "joined", "max_size", "oversize")

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME, keep_joined: bool = False) -> None:
        self.max_size = max_size
        self._partial = bytearray()
        self.oversize = False
        self._keep_joined = keep_joined
        #: With ``keep_joined``: the bytes the last ``feed`` made by joining a held
        #: partial message to new data (the caller may wipe them), else None.
        self.joined: bytes | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held (0 between messages)."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return each complete non-blank line, without its newline."""
        self.joined = None
        if self.oversize:
            return []
        if self._partial:
            # One new object, no intermediate copy; the held part is zeroed in place.
            data = b"".join((self._partial, data))
            self.wipe()
            if self._keep_joined:
                self.joined = data
        *lines, rest = data.split(b"\n")
        frames: list[bytes] = []
        for line in lines:
            if len(line) > self.max_size:
                self.oversize = True
                return frames
            if line.endswith(b"\r"):
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
