"""Read another process's memory through /proc (root, or CAP_SYS_PTRACE): where a
byte string still lies after the process was told to forget it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SKIP = ("[vvar]", "[vsyscall]", "[vdso]")


@dataclass(frozen=True)
class Hit:
    address: int
    mapping: str  # the file mapped there, [heap], or "anon"
    context: bytes  # up to 64 bytes either side: which object holds it

    def __str__(self) -> str:
        return f"{self.address:#x} in {self.mapping}: {self.context!r}"


def readable_mappings(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, name) of every readable mapping of ``pid``."""
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        name = fields[5] if len(fields) > 5 else "anon"
        if fields[1][0] != "r" or name in _SKIP:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        found.append((start, end, name))
    return found


def scan(pid: int, needles: dict[str, bytes]) -> dict[str, list[Hit]]:
    """Every place in ``pid``'s readable memory where each needle occurs."""
    hits: dict[str, list[Hit]] = {label: [] for label in needles}
    patterns = {label: re.compile(re.escape(needle)) for label, needle in needles.items()}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, name in readable_mappings(pid):
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue  # a guard page or a mapping that went away meanwhile
            for label, pattern in patterns.items():
                for m in pattern.finditer(data):
                    hits[label].append(Hit(start + m.start(), name,
                                           data[max(0, m.start() - 64):m.end() + 64]))
    return hits


def encodings(text: str) -> dict[str, bytes]:
    """``text`` as CPython and the wire may hold it: UTF-8, Latin-1 (a str of kind 1),
    UTF-16-LE and UTF-32-LE (kinds 2 and 4)."""
    found = {enc: text.encode(enc) for enc in ("utf-8", "utf-16-le", "utf-32-le")}
    try:
        found["latin-1"] = text.encode("latin-1")
    except UnicodeEncodeError:
        pass
    return found
