"""One repair-run per VM at a time, wherever it runs; one per project folder.

**The VM lock** is a lease on the blob `locks/<vm_key>` in the evidence container (scripts.azure.identity:
the VM's readable name and a hash of its resource ID, so two VMs that share a name never share a lock).
Every runner that can act on a VM's repair stack reaches that container, so it is the one place two
runners on different machines (two pipeline jobs, a person and a pipeline) meet. The lease is taken for
60 s (Azure's longest finite lease; CRASHCART_LOCK_LEASE_SECONDS, 15-60) and renewed every third of that
by a background thread while the run lives; the blob's metadata names the holder (host, pid, run id,
start, current step). A second run for the same VM:
- refuses at once (exit 2, naming the holder) when the holder is a live process on this machine;
- otherwise waits up to one lease period: a crashed runner (SIGKILL, a lost machine) renews nothing, so
  its lease expires and the lock is taken - the safe way to break it, since a live runner can never lose
  it that way - and the new run names the crashed one and the step it died in; a lease still renewed
  after that wait belongs to a live run elsewhere: refused (exit 2) with who holds it.
The release (at the very end, after the teardown, deferred against signals like the teardown) records
how the run ended: `released`, or `teardown_failed`, which the next run names.
Creating the lock blob is the one write in evidence that is not If-None-Match under a run prefix: it is
created once per VM (If-None-Match: *, an existing one is reused) and only its lease and metadata change.

**The folder lock** (`cdktf.out/repair-run.lock`, an OS file lock) keeps a second run out of a project
folder while one works there: runs in one folder share `cdktf.out/stacks`, which synth rewrites for its
VM. The OS releases it when its process dies, however it dies, so it never goes stale.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.azure.errors import translate_azure_error
from scripts.azure.identity import vm_key
from scripts.azure.poll import poll
from scripts.base.errors import CrashcartError, ExitCode, first_line
from scripts.base.stop import StopRequest
from scripts.evidence.blobs import STORAGE_HINTS

log = logging.getLogger("crashcart.lock")

LOCK_PREFIX = "locks/"
FOLDER_LOCK_FILE = "repair-run.lock"
_META = ("run", "host", "pid", "started", "phase", "state", "vm")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _header_safe(value: object) -> str:
    """Metadata travels in HTTP headers: printable ASCII only."""
    return re.sub(r"[^\x20-\x7e]", "?", str(value))[:256]


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a lock, as its metadata says."""

    run: str = "?"
    host: str = "?"
    pid: int = 0
    started: str = "?"
    phase: str = "?"
    state: str = ""
    vm: str = ""

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> "Holder":
        found = {k: (metadata or {}).get(f"crashcart_{k}") for k in _META}
        pid = found.pop("pid") or "0"
        return cls(pid=int(pid) if pid.isdigit() else 0, **{k: v for k, v in found.items() if v})

    def metadata(self) -> dict[str, str]:
        return {f"crashcart_{k}": _header_safe(getattr(self, k)) for k in _META}

    def describe(self) -> str:
        return f"run {self.run} on {self.host} (pid {self.pid}), started {self.started}, in step '{self.phase}'"

    def is_alive_here(self) -> bool:
        return self.host == socket.gethostname() and _alive(self.pid)


class VmLock:
    """The lease on `locks/<vm_key>`: acquire, name the step, release."""

    def __init__(self, container: Any, vm_id: str, run_id: str, *, lease_seconds: int = 60,
                 stop: StopRequest | None = None):
        self.vm_id = vm_id
        self.name = LOCK_PREFIX + vm_key(vm_id)
        self.blob = container.get_blob_client(self.name)
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self.stop = stop
        self.holder = Holder(run=run_id, host=socket.gethostname(), pid=os.getpid(), started=now(),
                             phase="lock", state="running", vm=vm_id)
        self.previous: Holder | None = None  # who held it before this run
        self.lease: Any = None
        self.lost: str | None = None  # why the lease was lost, if it was
        self._done = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---- taking it ------------------------------------------------------------------------------------
    def acquire(self) -> None:
        from azure.core.exceptions import HttpResponseError, ResourceExistsError
        from azure.storage.blob import BlobLeaseClient

        try:
            self.blob.upload_blob(b"", overwrite=False, metadata=Holder(state="new", vm=self.vm_id).metadata())
        except ResourceExistsError:
            pass  # made by an earlier run: reused
        except HttpResponseError as err:
            if err.status_code != 412:  # 412: it exists and is leased right now
                raise self._error(err, "create the lock blob") from None
        lease = BlobLeaseClient(self.blob)
        waiting: list[Holder] = []

        def attempt() -> bool | None:
            try:
                lease.acquire(lease_duration=self.lease_seconds)
                return True
            except HttpResponseError as err:
                if err.status_code != 409:
                    raise self._error(err, "take the lock") from None
            holder = self.read_holder()
            if holder.is_alive_here():
                raise self._held(holder, "")
            if not waiting:
                log.warning("    %s is locked by %s; that runner may have crashed: waiting up to %ds for its lease "
                            "to expire", self.name, holder.describe(), self.lease_seconds)
            waiting[:] = [holder]
            return None

        poll(attempt, timeout_s=self.lease_seconds + 5, interval_s=1.0, max_interval_s=5.0, backoff=1.5,
             stop=self.stop, on_timeout=lambda: self._held(waiting[-1], f" (its lease was still renewed after "
                                                                        f"{self.lease_seconds + 5}s)"))
        self.lease = lease
        previous = self.read_holder()
        self.previous = previous if previous.state not in ("", "new") else None  # None: first run for this VM
        self._write_metadata()
        self._renewer = threading.Thread(target=self._renew, name="crashcart-lock-renewer", daemon=True)
        self._renewer.start()
        self._tell_about_previous()
        log.info("    %s: this run holds the lock of %s (lease %ds, renewed every %ds)", self.name, self.vm_id,
                 self.lease_seconds, self.renew_every)

    def _tell_about_previous(self) -> None:
        prev = self.previous
        if prev is None or prev.state == "released":
            return
        if prev.state == "running":
            log.warning("    an earlier run (%s) stopped without finishing; checking what it left", prev.describe())
        elif prev.state == "teardown_failed":
            log.warning("    the last run (%s) could not destroy the repair stack; this run takes it on",
                        prev.describe())

    def _held(self, holder: Holder, longer: str) -> CrashcartError:
        return CrashcartError(
            f"another repair-run is working on {self.vm_id}: {holder.describe()}{longer}",
            f"wait for it to finish (it releases {self.name} in the evidence container at its end), or stop it "
            f"with SIGTERM (it tears down first); a crashed run's lock frees itself within {self.lease_seconds}s",
            ExitCode.USAGE)

    # ---- while the run lives ----------------------------------------------------------------------------
    @property
    def renew_every(self) -> float:
        return self.lease_seconds / 3

    def _renew(self) -> None:
        from azure.core.exceptions import HttpResponseError

        last_ok = time.monotonic()
        while not self._done.wait(self.renew_every):
            try:
                self.lease.renew()
                last_ok = time.monotonic()
            except HttpResponseError as err:
                if err.status_code == 409:  # another lease now: ours expired
                    self._lose(f"the lease was taken over ({first_line(err)})")
                    return
                log.warning("    could not renew the lock %s (%s); retrying", self.name, first_line(err))
            except Exception as err:  # noqa: BLE001 - a network error must not end the renewals
                log.warning("    could not renew the lock %s (%s); retrying", self.name, first_line(err))
            if time.monotonic() - last_ok > self.lease_seconds:
                self._lose(f"not renewed for over {self.lease_seconds}s")
                return

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error("    the lock %s was lost: %s; another run for %s may start", self.name, why, self.vm_id)

    def check(self) -> None:
        """Between steps: a lost lock stops the run (the teardown still runs: the stack is this run's)."""
        if self.lost:
            raise CrashcartError(f"this run lost its lock on {self.vm_id} ({self.lost})",
                                 "check the connection to the evidence storage account and re-run",
                                 ExitCode.AZURE_FAILED)

    def phase(self, name: str) -> None:
        """Names the current step in the lock's metadata (best effort: the lock is the lease, not this)."""
        if self.lease is None:
            return
        self.holder = dataclasses.replace(self.holder, phase=name)
        self._write_metadata()

    def read_holder(self) -> Holder:
        try:
            return Holder.from_metadata(self.blob.get_blob_properties().metadata)
        except Exception as err:  # noqa: BLE001 - who holds it is information, not a condition
            log.debug("    could not read the holder of %s: %s", self.name, first_line(err))
            return Holder()

    def _write_metadata(self) -> None:
        try:
            self.blob.set_blob_metadata(self.holder.metadata(), lease=self.lease)
        except Exception as err:  # noqa: BLE001 - e.g. a container immutability policy: the lease still holds
            log.debug("    could not write the holder into %s: %s", self.name, first_line(err))

    # ---- giving it back -----------------------------------------------------------------------------------
    def release(self, state: str = "released") -> None:
        """Stops renewing, records how the run ended (`released`, `teardown_failed`, `kept`) and releases
        the lease. Never raises: an unreleased lease frees itself within a lease period."""
        if self.lease is None:
            return
        self._done.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        self.holder = dataclasses.replace(self.holder, state=state)
        self._write_metadata()
        try:
            self.lease.release()
            log.info("    released the lock %s", self.name)
        except Exception as err:  # noqa: BLE001
            log.warning("    could not release the lock %s (%s): it frees itself within %ds", self.name,
                        first_line(err), self.lease_seconds)
        self.lease = None

    def _error(self, err: BaseException, doing: str) -> CrashcartError:
        return translate_azure_error(err, f"the lock blob {self.name}", doing=f"{doing} ({self.name})",
                                     hints=STORAGE_HINTS)


class FolderLock:
    """An exclusive OS lock on <folder>/repair-run.lock for the life of the run, with who holds it inside."""

    def __init__(self, folder: Path, run_id: str):
        self.path = Path(folder) / FOLDER_LOCK_FILE
        self.run_id = run_id
        self._fd: int | None = None

    def claim(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(fd)
            os.close(fd)
            raise CrashcartError(
                f"another repair-run is working in this project folder (run {holder.get('run', '?')}, pid "
                f"{holder.get('pid', '?')}, started {holder.get('started', '?')})",
                "runs in one folder share cdktf.out (the stacks synth writes for one VM): wait for it to finish, "
                "or repair another VM from its own folder (--project-dir)", ExitCode.USAGE) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                                  "started": now()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_json(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
