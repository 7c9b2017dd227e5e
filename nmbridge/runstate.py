"""What a running bridge keeps under ``/run/nmbridge/links/``: a lock and a restore record
per interface it uses.

**Locks.**  ``<netns>-<ifindex>.lock`` (``netns``: the inode of the network namespace, so
the same ifindex in two namespaces never collides), ``flock()``-ed for as long as the bridge
uses the interface, holding ``"<pid> <ifname>"``.  Taken after every interface is looked up
and checked and before the first one is changed; a second bridge on an interface is refused
in one line naming the holder's pid.  The kernel drops a flock when its process dies, so a
``kill -9`` never leaves an interface locked.  Released (the file removed while still
locked) when the bridge stops using the interface.

**Restore records.**  ``<netns>-<ifindex>.json``: what link set-up changed on the interface
and the value to put back (:func:`nmbridge.links.record_to_dict`), written atomically
(temporary file + rename) on every change and removed once restored.  A record found next to
a lock nobody held was left by a bridge that died without restoring: the next bridge on that
interface adopts it — it restores to that *true* original state, not to the state the dead
run left — and says so once (``link_record_recovered``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Collection, Mapping

import structlog

from nmbridge.errors import LinkError
from nmbridge.links import LinkState, RestoreRecord, _describe, record_from_dict, record_to_dict

log = structlog.get_logger("nmbridge.links")

DEFAULT_DIR = "/run/nmbridge"


def state_dir() -> str:
    """``$NMBRIDGE_STATE_DIR``, else /run/nmbridge."""
    return os.environ.get("NMBRIDGE_STATE_DIR") or DEFAULT_DIR


def netns_id() -> str:
    """The calling thread's network namespace, as a name for files."""
    return f"net{os.stat('/proc/thread-self/ns/net').st_ino}"


class InterfaceLocks:
    """The locks and records of the interfaces one bridge uses (see the module doc)."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.join(directory, "links")
        self.held: dict[str, tuple[int, str]] = {}  # ifname -> (lock fd, key)

    def _prepare(self) -> None:
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            st = os.stat(self.directory)
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise _no_directory(self.directory, e) from None
        if st.st_mode & stat.S_IWOTH:
            raise LinkError(f"{self.directory} is writable by everyone: refusing to keep interface "
                            "locks there (use a directory only the bridge's user can write)")

    def acquire(self, states: Mapping[str, LinkState]) -> dict[str, RestoreRecord]:
        """Lock every interface of ``states`` (all or none); return the records bridges that
        died left for some of them."""
        todo = [n for n in states if n not in self.held]
        if not todo:
            return {}
        self._prepare()
        ns = netns_id()
        taken: list[str] = []
        adopted: dict[str, RestoreRecord] = {}
        try:
            for name in todo:
                key = f"{ns}-{states[name].index}"
                self.held[name] = (self._lock(name, key), key)
                taken.append(name)
                rec = self._stale(name, key, states[name].index)
                if rec is not None:
                    adopted[name] = rec
        except BaseException:
            self.release(taken)
            raise
        return adopted

    def _lock(self, name: str, key: str) -> int:
        path = os.path.join(self.directory, f"{key}.lock")
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as e:
                raise _no_directory(self.directory, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LinkError(f"interface {name} is in use by another nmbridge (pid {_holder(path)}; "
                                f"lock {path}): two bridges on one interface would duplicate every "
                                "frame") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder removed between our open and our lock
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {name}\n".encode())
                return fd
            os.close(fd)
        raise LinkError(f"interface {name}: cannot take the lock {path} (it keeps being replaced)")

    def _stale(self, name: str, key: str, index: int) -> RestoreRecord | None:
        path = os.path.join(self.directory, f"{key}.json")
        try:
            with open(path) as f:
                rec = record_from_dict(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("link_record_unreadable", ifname=name, path=path, reason=str(e))
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        if rec.index != index or rec.ifname != name:  # another interface (a reused netns inode)
            log.warning("link_record_ignored", ifname=name, path=path, record_for=rec.ifname)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        log.warning("link_record_recovered", ifname=name, path=path, original=_describe(rec, original=True),
                    note="a bridge that used this interface died without restoring it: its original "
                         "state is restored when this one stops")
        return rec

    def save(self, name: str, rec: RestoreRecord | None) -> None:
        """Persist `name`'s record (None: restored, remove it)."""
        held = self.held.get(name)
        if held is None:
            return
        path = os.path.join(self.directory, f"{held[1]}.json")
        if rec is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record_to_dict(rec), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def release(self, names: Collection[str]) -> None:
        """Unlock `names` (the lock file is removed while still locked).  A record still there
        (its restore failed) stays for the next bridge on the interface."""
        for name in list(names):
            held = self.held.pop(name, None)
            if held is None:
                continue
            fd, key = held
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, f"{key}.lock"))
            os.close(fd)

    def release_all(self) -> None:
        self.release(list(self.held))


def _no_directory(directory: str, e: OSError) -> LinkError:
    return LinkError(f"cannot keep interface locks in {directory}: {e.strerror or e} (run as root or "
                     "the service user, or point --state-dir / $NMBRIDGE_STATE_DIR at a directory of "
                     "your own)")


def _holder(path: str) -> str:
    """The pid written in a lock file (its holder writes it just after locking)."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            with open(path) as f:
                text = f.read().split()
        except OSError:
            text = []
        if text and text[0].isdigit():
            return text[0]
        if time.monotonic() > deadline:
            return "unknown"
        time.sleep(0.01)
