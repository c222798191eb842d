"""A throwaway PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary
folder, loopback only, trust authentication, stopped by the session's finalizer.

scripts/setup.sh installs the `postgresql` package where it is missing (as root); without it the
PostgreSQL tests fail with that instruction rather than pass unseen.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from contextlib import closing
from pathlib import Path


def binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run `make setup` as root (it installs Debian's postgresql "
                           "package), or `sudo apt-get install postgresql`")
    return Path(found[-1]).parent


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl start in a fresh folder; `url(db)` names a database on it."""

    def __init__(self):
        self.bin = binaries()
        # Not under pytest's tmp_path: its root is private to root, and the server (run as the
        # `postgres` user when we are root, since PostgreSQL refuses root) must enter this folder.
        self.dir = Path(tempfile.mkdtemp(prefix="vismem-pg-"))
        self.dir.chmod(0o755)
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresServer":
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.data, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options, "-w", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2
        con = psycopg2.connect(self.url())
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        con.close()
        return self.url(name)

    def home_dir(self) -> Path:
        """A folder for memory homes that the server may read (original_name() reads names.bin)."""
        homes = self.dir / "homes"
        homes.mkdir(exist_ok=True)
        homes.chmod(0o755)
        return homes
