"""A throwaway PostgreSQL 16 server with pgvector, from the ``pgserver`` wheel, for the tests and benchmarks:
started in a temporary folder, listening on a Unix socket there only (no TCP port). As root it runs as the
unprivileged user ``nobody`` (PostgreSQL refuses to run as root)."""
from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path


def _binaries() -> Path:
    """pgserver's bin folder, or a copy of its installation that ``nobody`` can reach (a checkout under
    /root, mode 700, is not)."""
    import importlib.util
    spec = importlib.util.find_spec("pgserver")  # not imported: its import reads platform folders it never uses
    if spec is None:
        raise RuntimeError("the PostgreSQL tests need the pgserver wheel: pip install 'clipforge[test]'")
    install = Path(spec.submodule_search_locations[0]) / "pginstall"
    if os.geteuid() != 0 or all(os.stat(p).st_mode & stat.S_IXOTH for p in [install, *install.parents]):
        return install / "bin"
    copy = Path(tempfile.gettempdir()) / f"clipforge-pginstall-{os.stat(install).st_ino}"
    if not (copy / "bin" / "postgres").exists():
        partial = Path(tempfile.mkdtemp(prefix="clipforge-pginstall-"))
        shutil.copytree(install, partial / "pginstall", symlinks=True)
        os.chmod(partial, 0o755)
        try:
            os.rename(partial / "pginstall", copy)
        except OSError:  # another session copied it first
            shutil.rmtree(partial / "pginstall", ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    return copy / "bin"


class LocalPostgres:
    """``start()``, ``stop()``, ``url(table)``; the database ``clipforge`` owned by the role ``clipforge``,
    which may create extensions (trust authentication on the socket)."""

    def __init__(self, settings: dict | None = None):
        self.settings = {"max_connections": "60", **(settings or {})}  # server settings (-c NAME=VALUE)
        self.root = Path(tempfile.mkdtemp(prefix="clipforge-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.bin = _binaries()
        self._as = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]
        os.chmod(self.root, 0o755)
        self._run("initdb", "-D", str(self.data), "-U", "clipforge", "--auth=trust", "-E", "UTF8", "--locale=C")
        self.start()
        self._run("createdb", "-h", str(self.root), "-U", "clipforge", "clipforge")

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self._as, str(self.bin / program), *args], capture_output=True, text=True,
                              cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} failed: {done.stderr or done.stdout}\n{log[-2000:]}")

    def start(self) -> None:
        settings = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o",
                  f"-c listen_addresses='' -k {self.root} {settings}", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> dict:
        """A new empty database; returns the libpq environment (PGHOST, PGUSER, PGDATABASE) that names it."""
        self._run("createdb", "-h", str(self.root), "-U", "clipforge", name)
        return {"PGHOST": str(self.root), "PGUSER": "clipforge", "PGDATABASE": name}

    def url(self, table: str = "clipforge") -> str:
        return f"postgresql://clipforge@/clipforge?host={self.root}&table={table}"

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
