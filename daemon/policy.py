"""Per-client access rules: who may do what to which names.

A TOML file (``policy_file`` / ``--policy``), of this shape (keep these names:
operators' files must stay valid across versions)::

    [[rule]]
    user = "hue"                  # or uid = 1001; group = "gateway" / gid = 990; unit = "x.service"
    names = ["provider/hue/*"]    # globs on /-segments: "*" one segment, "**" any number
    allow = ["read", "list"]      # read, list, write, delete, watch, admin

    [[credential]]                # systemd LoadCredential= through the credentials socket
    unit = "hue-bridge.service"
    id = "hue_token"
    name = "provider/hue/token"

Without a file: the agent's own uid and root have every right, others none
(and are refused at connect). With one: the agent's uid and root still have
every right (the uid is the boundary: they can read the files anyway);
everyone else has only what a rule grants. A rule's selectors (user/uid,
group/gid, unit) must all match, and at least one is required. A ``unit`` is a
system unit; a unit of a user's own service manager (``systemctl --user``)
matches only a rule that also names that user, since the user names it. An
unknown key, action, user or group makes the whole file invalid.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal, get_args

import msgspec

from homeagent_secrets.protocol.errors import SecretsError
from homeagent_secrets.protocol.messages import Action, Right
from homeagent_secrets.protocol.names import glob_regex, name_problem, pattern_problem

from .peer import Peer

Grant = Literal["read", "list", "write", "delete", "watch", "admin"]
GRANTS: Final[tuple[str, ...]] = get_args(Grant)
_NAME_ACTIONS: Final = frozenset({"read", "list", "write", "delete", "watch"})


class PolicyError(SecretsError):
    """The rules file is invalid; the message names the file, the entry and the problem."""


class _RuleDoc(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    allow: Annotated[list[Grant], msgspec.Meta(min_length=1)]
    names: list[str] = []
    user: str | None = None
    uid: int | None = None
    group: str | None = None
    gid: int | None = None
    unit: str | None = None


class _CredentialDoc(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    unit: str
    id: str
    name: str


class _PolicyDoc(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    rule: list[_RuleDoc] = []
    credential: list[_CredentialDoc] = []


@dataclass(frozen=True)
class Rule:
    uid: int | None
    gid: int | None
    unit: str | None
    names: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    allow: frozenset[str]

    def applies_to(self, peer: Peer) -> bool:
        return ((self.uid is None or peer.uid == self.uid)
                and (self.gid is None or peer.in_group(self.gid))
                and (self.unit is None or self._is_unit_of(peer)))

    def _is_unit_of(self, peer: Peer) -> bool:
        # A unit of a user's own manager was named by that user: it proves
        # nothing unless the rule is for that very user anyway.
        return peer.unit == self.unit and (peer.manager is None or peer.manager == self.uid)

    def covers(self, name: str) -> bool:
        slashed = "/" + name
        return any(p.match(slashed) for p in self.patterns)


@dataclass(frozen=True)
class Credential:
    unit: str
    id: str
    name: str


class Rights:
    """What one peer may do: everything (the agent's uid, root), or its rules."""

    def __init__(self, rules: tuple[Rule, ...], everything: bool) -> None:
        self.rules = rules
        self.everything = everything

    def may(self, action: Action, name: str | None = None) -> bool:
        """Whether ``action`` is allowed (on ``name`` for a name's action)."""
        if self.everything or action == "public":
            return True
        for rule in self.rules:
            if action in rule.allow and (action not in _NAME_ACTIONS or name is None or rule.covers(name)):
                return True
        return False

    def describe(self) -> list[Right]:
        if self.everything:
            return [Right(["**"], list(GRANTS))]
        return [Right(list(r.names), sorted(r.allow)) for r in self.rules]


class Policy:
    """The rules in force (None file: the behaviour without rules)."""

    def __init__(self, rules: tuple[Rule, ...] = (), credentials: tuple[Credential, ...] = (),
                 path: Path | None = None) -> None:
        self.rules = rules
        self.credentials = {(c.unit, c.id): c.name for c in credentials}
        self.path = path
        self._owner = os.getuid()

    @property
    def active(self) -> bool:
        """Whether a rules file is in force (other uids may then be served)."""
        return self.path is not None

    def trusted(self, peer: Peer) -> bool:
        """The agent's own uid and root: every right, always."""
        return peer.uid == self._owner or peer.uid == 0

    def rights(self, peer: Peer) -> Rights:
        if self.trusted(peer):
            return Rights((), True)
        if not peer.identified:  # any other user at all (a PrivateUsers= namespace): nothing
            return Rights((), False)
        return Rights(tuple(r for r in self.rules if r.applies_to(peer)), False)

    def credential_name(self, unit: str, id_: str) -> str | None:
        return self.credentials.get((unit, id_))


def _where(path: Path, kind: str, index: int) -> str:
    return f"{path}: [[{kind}]] #{index + 1}"


def _uid_of(user: str, where: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise PolicyError(f"{where}: no user named {user!r} on this system") from None


def _gid_of(group: str, where: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise PolicyError(f"{where}: no group named {group!r} on this system") from None


def _rule(doc: _RuleDoc, where: str) -> Rule:
    if doc.user is not None and doc.uid is not None:
        raise PolicyError(f"{where}: give user or uid, not both")
    if doc.group is not None and doc.gid is not None:
        raise PolicyError(f"{where}: give group or gid, not both")
    uid = _uid_of(doc.user, where) if doc.user is not None else doc.uid
    gid = _gid_of(doc.group, where) if doc.group is not None else doc.gid
    if uid is None and gid is None and doc.unit is None:
        raise PolicyError(f"{where}: say whom it is for (user/uid, group/gid or unit); a rule "
                          "for everyone is not allowed")
    if set(doc.allow) & _NAME_ACTIONS and not doc.names:
        raise PolicyError(f"{where}: {', '.join(sorted(set(doc.allow) & _NAME_ACTIONS))} need names")
    for pattern in doc.names:
        if pattern_problem(pattern) is not None:
            raise PolicyError(f"{where}: {pattern!r} is not a name pattern (segments of "
                              "A-Z a-z 0-9 . _ - joined by '/', with * and ** as wildcards)")
    return Rule(uid, gid, doc.unit, tuple(doc.names), tuple(glob_regex(p) for p in doc.names),
                frozenset(doc.allow))


def _check_owner(path: Path, st: os.stat_result) -> None:
    """Refuse rules another user could have written: whoever can, grants itself anything."""
    me = os.getuid()
    if st.st_uid not in (0, me):
        raise PolicyError(f"{path}: the rules file belongs to uid {st.st_uid}, who could grant itself "
                          "every right; make it root's (or this agent's user's)")
    if st.st_mode & 0o022:
        raise PolicyError(f"{path}: the rules file is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}), who could grant themselves every right; chmod go-w it")
    parent = os.stat(path.parent)
    if parent.st_uid not in (0, me) or (parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX):
        raise PolicyError(f"{path}: its directory lets other users replace the rules file; keep it in a "
                          "directory only root (or this agent's user) can write")


def load(path: Path) -> Policy:
    """The rules in ``path``; PolicyError (one line) when anything in it is wrong."""
    try:
        with open(path, "rb") as f:
            _check_owner(path, os.fstat(f.fileno()))
            raw = tomllib.load(f)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the rules file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from None
    try:
        doc = msgspec.convert(raw, _PolicyDoc)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{path}: {exc}".replace("`", "")) from None
    rules = tuple(_rule(r, _where(path, "rule", i)) for i, r in enumerate(doc.rule))
    creds = []
    for i, c in enumerate(doc.credential):
        if name_problem(c.name) is not None:
            raise PolicyError(f"{_where(path, 'credential', i)}: {c.name!r} is not a secret name")
        creds.append(Credential(c.unit, c.id, c.name))
    return Policy(rules, tuple(creds), path)
