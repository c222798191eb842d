"""A cluster started by scripts/cluster.sh in a temporary folder on free ports, and read back
through its Dagster instance: what tests/test_cluster.py and benchmarks/cluster.py drive."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "scripts" / "cluster.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env_file(path: Path) -> dict[str, str]:
    """cluster.env's exports, as a shell that sources it has them."""
    out = subprocess.run(["bash", "-c", f"set -a; source {path}; env -0"], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout.decode()
    return dict(kv.split("=", 1) for kv in out.split("\0")
                if kv and kv.split("=", 1)[0].startswith(("VISMEM_", "DAGSTER_HOME")))


@contextmanager
def environment(values: dict[str, str]):
    """os.environ with these values for the duration, restored after (the instance's config and
    the memory's settings read it when they are built)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LocalCluster:
    """`scripts/cluster.sh up` in a fresh folder (not under pytest's 0700 tmp: the postgres user
    must enter it), on free ports; `extra_env` e.g. VISMEM_EMBED_WORKERS."""

    def __init__(self, extra_env: dict[str, str] | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="vismem-cluster-"))
        self.root.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VISMEM_", "DAGSTER_"))}
        self.env.update(VISMEM_CLUSTER_DIR=str(self.root), VISMEM_CLUSTER_PG_PORT=str(free_port()),
                        VISMEM_CLUSTER_REDIS_PORT=str(free_port()), VISMEM_CLUSTER_WEB_PORT=str(free_port()),
                        **(extra_env or {}))
        self.exports: dict[str, str] = {}

    def sh(self, command: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(CLUSTER_SH), command], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def up(self) -> "LocalCluster":
        """Start it; a RuntimeError with the script's output and the logs if it does not come up."""
        done = self.sh("up")
        if done.returncode != 0:
            logs = self.logs()
            left = self.down()  # what it did start goes again
            raise RuntimeError(f"scripts/cluster.sh up failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                               f"{logs}" + (f"\nand down left {left} running" if left else ""))
        self.exports = read_env_file(self.root / "cluster.env")
        return self

    def down(self) -> list[int]:
        """Stop it and remove its folder; the pids it started that are still alive after 30 s."""
        started = self.pids()
        done = self.sh("down", timeout=120)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p in started if alive(p)]
        shutil.rmtree(self.root, ignore_errors=True)
        if done.returncode != 0:
            raise RuntimeError(f"scripts/cluster.sh down failed:\n{done.stdout}\n{done.stderr}")
        return left

    def logs(self, n: int = 40) -> str:
        parts = []
        for log in sorted((self.root / "logs").glob("*.log")):
            parts.append(f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)

    @property
    def home(self) -> Path:
        return Path(self.exports["VISMEM_HOME"])

    def instance(self):
        from dagster import DagsterInstance
        with environment(self.exports):
            return DagsterInstance.from_config(self.exports["DAGSTER_HOME"])

    def settings(self):
        """The memory's settings as a shell that sourced cluster.env has them (the ledger URL included)."""
        from vismem_assets.settings import Settings
        with environment(self.exports):
            return Settings.from_env()

    def pids(self) -> list[int]:
        files = list((self.root / "pids").glob("*.pid")) + [self.root / "redis" / "redis.pid"]
        pids = [int(f.read_text().split()[0]) for f in files if f.exists()]
        postmaster = self.root / "postgres" / "data" / "postmaster.pid"
        if postmaster.exists():
            pids.append(int(postmaster.read_text().split()[0]))
        return pids

    def drop(self, folder: Path, name: str) -> None:
        """Copy a set into the inbox whole, then mark it ready, as a careful user would."""
        target = self.home / "inbox" / "sets" / name
        shutil.copytree(folder, target)
        (target / "_READY").touch()


def steps(instance, run_id: str) -> dict[str, dict]:
    """step key -> {submitted, start, end, status, metadata of its outputs} from a run's event log."""
    from dagster import DagsterEventType

    out: dict[str, dict] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        step = out.setdefault(entry.step_key, {"metadata": {}})
        if event.event_type == DagsterEventType.ENGINE_EVENT and (event.message or "").startswith("Submitting celery"):
            step.setdefault("submitted", entry.timestamp)
        elif event.event_type == DagsterEventType.STEP_START:
            step["start"] = entry.timestamp
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            step["end"], step["status"] = entry.timestamp, event.event_type.value
        elif event.event_type == DagsterEventType.STEP_OUTPUT:
            step["metadata"].update({k: v.value for k, v in event.step_output_data.metadata.items()})
    return out


def run_interval(instance, run_id: str) -> tuple[float, float]:
    """(RUN_START, RUN_SUCCESS or RUN_FAILURE) timestamps of a run."""
    from dagster import DagsterEventType

    times = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.event_type in (DagsterEventType.RUN_START, DagsterEventType.RUN_SUCCESS,
                                                      DagsterEventType.RUN_FAILURE):
            times.setdefault(event.event_type, entry.timestamp)
    end = times.get(DagsterEventType.RUN_SUCCESS) or times.get(DagsterEventType.RUN_FAILURE)
    return times[DagsterEventType.RUN_START], end
