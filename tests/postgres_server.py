"""A throwaway PostgreSQL server for the tests, started and stopped by scripts/services.sh (the
same script the cluster profile uses): Debian's binaries, a cluster in a temporary folder on
loopback, reached as its superuser through its socket (trusted), stopped by the finalizer.

scripts/setup.sh installs the `postgresql` package where it is missing (as root); without it
these tests fail with that instruction rather than pass unseen.
"""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import tempfile
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "scripts" / "services.sh"


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
    def __init__(self):
        binaries()  # a clear error first, if it is not installed
        # Not under pytest's tmp_path: its root is private, and the server (the `postgres` user
        # when we are root) must reach its own folder and read names.bin in the homes beside it.
        self.dir = Path(tempfile.mkdtemp(prefix="vismem-pg-"))
        self.dir.chmod(0o755)
        self.cluster = self.dir / "pg"
        self.port = free_port()

    def _services(self, *args: str) -> None:
        done = subprocess.run(["bash", str(SERVICES), *args], capture_output=True, text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"scripts/services.sh {' '.join(args)} failed: {done.stderr.strip()}")

    def start(self) -> "PostgresServer":
        self._services("pg-start", str(self.cluster), str(self.port))
        return self

    def crash(self) -> None:
        """Stop it as a crash would (`pg_ctl stop -m immediate`: no checkpoint, recovery at start)."""
        cmd = [str(binaries() / "pg_ctl"), "-D", str(self.cluster / "data"), "-m", "immediate", "-w", "stop"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self._services("pg-stop", str(self.cluster))
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.cluster}&port={self.port}"

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
