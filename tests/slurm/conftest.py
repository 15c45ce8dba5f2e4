"""A real single-node Slurm cluster on this machine, for the tests of profiles/slurm.

The ``slurm_cluster`` fixture installs the Debian packages where they are missing
(tests/slurm/install-slurm.sh: root and apt-get only, else the tests skip with the reason),
then starts, in a private folder and inside namespaces of its own (a network whose only
interface is the loopback, so nothing outside, nor another test run on this machine, can
reach the daemons, which use Slurm's default ports there; a mount namespace that shows the
cluster's config folder at /etc/slurm):

    munged      its own key and socket (Slurm's authentication)
    mariadbd    a throw-away database for slurmdbd
    slurmdbd    job accounting: `sacct`, which the executor plugin polls for job states
                (its default status command), reads the job records from here
    slurmctld   one cluster with two partitions, `cpu` (default) and `gpu`, matching
                profiles/slurm/partitions.yaml
    slurmd      one node with this machine's CPUs, memory from /proc/meminfo and one
                GPU declared as a generic resource (no device behind it), so that a job
                asking for `--gpus=1` is scheduled and recorded like on a GPU node

and registers an account (``SlurmCluster.account``) so that `-A` is checked for real
(AccountingStorageEnforce=associations). Every client command reaches this cluster through
``SLURM_CONF``; ``SlurmCluster.command()`` puts a command into the namespace and
``SlurmCluster.env()`` is the environment to run it with.

Under pytest-xdist the workers share one cluster: the first user starts it, a counter in a
locked state file records who uses it, and the last user stops it (a fixture finaliser),
ending each daemon by the process id it was started with.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INSTALL_SCRIPT = HERE / "install-slurm.sh"
SBIN_PATH = "/usr/sbin:/sbin"
#: what the fixture runs (install-slurm.sh installs the packages that bring them)
REQUIRED_COMMANDS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "munged", "mariadbd",
                     "mariadb-install-db", "mariadb", "ip", "unshare", "nsenter")
CLUSTER_NAME = "mambapath"
NODE_NAME = "mambapath-node"
ACCOUNT = "mambapath-ci"
#: MinJobAge: finished jobs leave slurmctld's memory (and squeue) after this, so job states
#: must come from the accounting records (sacct), as on a busy cluster
MIN_JOB_AGE_S = 30
#: longest wait for a daemon to come up
START_TIMEOUT_S = 90


def _which(command: str) -> str | None:
    return shutil.which(command, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def _install_or_skip() -> None:
    """Install the packages where they are missing; skip (with the reason) where that cannot be done."""
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.skip(f"Slurm is not installed and cannot be installed here: {result.stderr.strip()[-500:]}")


#: run by `unshare --net --mount` with the cluster's etc folder as $1: bring up the
#: namespace's loopback, show the cluster's config at Slurm's default path (/etc/slurm), then
#: hold the namespaces open. The default path matters because a SLURM job's nested `srun`
#: runs without SLURM_CONF (the jobstep executor drops SLURM_* variables). 127.0.0.2 is there
#: because getaddrinfo(AI_ADDRCONFIG), which Slurm uses, finds no IPv4 address when
#: 127.0.0.1 is the only one, and the daemons then cannot bind at all.
_NAMESPACE_HOLDER = (
    'ip link set lo up && ip addr add 127.0.0.2/8 dev lo && mkdir -p /etc/slurm && mount --bind "$1" /etc/slurm'
    " && echo ready && exec sleep infinity"
)
#: Slurm's and MariaDB's default ports: free inside the private namespace
PORTS = {"slurmctld": 6817, "slurmd": 6818, "slurmdbd": 6819, "mariadb": 3306}


def _real_memory_mb() -> int:
    """MemTotal in MB, less a margin: slurmd drains a node that declares more than it has."""
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE).group(1))
    return int(total_kb / 1024 * 0.95)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@contextmanager
def _locked(path: Path):
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class SlurmCluster:
    root: Path  # config, state, logs and sockets of this cluster
    account: str = ACCOUNT
    partitions: tuple[str, ...] = ("cpu", "gpu")
    node: str = NODE_NAME
    _namespace_pid: int | None = None  # set while this process starts the cluster

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment that reaches this cluster (SLURM_CONF) and finds the repository's .venv commands."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}:{SBIN_PATH}"
        env.update(extra)
        return env

    def command(self, args: list[str], cwd: str | os.PathLike | None = None) -> list[str]:
        """``args`` run inside the cluster's namespaces (in ``cwd``: entering a mount namespace resets it)."""
        holder = self._read_state()["pids"].get("namespaces") if self._namespace_pid is None else self._namespace_pid
        if holder is None:
            raise RuntimeError(f"the Slurm cluster in {self.root} is not running")
        return ["nsenter", f"--net=/proc/{holder}/ns/net", f"--mount=/proc/{holder}/ns/mnt",
                f"--wd={Path(cwd or self.root).resolve()}", "--", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        result = subprocess.run(self.command(list(args)), env=self.env(), capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    # --- state shared between test processes -------------------------------------------------

    def _read_state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {"users": 0, "pids": {}}

    def _write_state(self, state: dict) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    def _running(self, state: dict) -> bool:
        return bool(state["pids"]) and all(_alive(pid) for pid in state["pids"].values())

    def acquire(self) -> None:
        """Start the cluster unless another test process already runs it; count this user."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / "cluster.lock"):
            state = self._read_state()
            if not self._running(state):
                self._stop_pids(state["pids"])
                state = {"users": 0, "pids": self._start()}
            state["users"] += 1
            self._write_state(state)

    def release(self) -> None:
        """Uncount this user; the last one stops every daemon."""
        with _locked(self.root / "cluster.lock"):
            state = self._read_state()
            state["users"] = max(0, state["users"] - 1)
            if state["users"] == 0:
                self.run("scancel", "--full", "--user", str(os.getuid()), check=False)
                self._stop_pids(state["pids"])
                state["pids"] = {}
            self._write_state(state)

    # --- start and stop ----------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> int:
        log = open(self.log_dir / f"{name}.out", "ab")
        process = subprocess.Popen(self.command(args), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                   start_new_session=True)  # survives the test process that started it
        log.close()
        return process.pid

    def _start_namespace(self) -> int:
        """Network (loopback only) and mount namespaces, held open by a sleeping process."""
        holder = subprocess.Popen(["unshare", "--net", "--mount", "--", "sh", "-c", _NAMESPACE_HOLDER, "holder",
                                   str(self.root / "etc")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        if holder.stdout.readline().strip() != "ready":
            holder.wait(timeout=10)
            pytest.skip(f"cannot create private namespaces for Slurm (unshare --net --mount): "
                        f"{holder.stderr.read().strip()[-300:]}")
        return holder.pid

    def _wait(self, what: str, ready, pid: int, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready():
                return
            if not _alive(pid):
                break
            time.sleep(0.5)
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise RuntimeError(f"{what} did not start (pid {pid}); its log {log}:\n{tail}")

    def _start(self) -> dict[str, int]:
        for sub in ("etc", "log", "state", "spool", "munge", "db", "run"):
            # a fresh cluster each time: nothing left from one that stopped or crashed here
            shutil.rmtree(self.root / sub, ignore_errors=True)
            (self.root / sub).mkdir(parents=True)
        os.chmod(self.root / "munge", 0o700)
        ports = PORTS
        hostname = socket.gethostname().split(".")[0]
        munge_socket = self.root / "munge" / "munge.socket"
        db_socket = self.root / "run" / "mariadb.sock"
        db_password = secrets.token_hex(12)
        pids: dict[str, int] = {"namespaces": self._start_namespace()}
        self._namespace_pid = pids["namespaces"]
        try:
            # munge: a fresh key, a private socket
            key = self.root / "munge" / "munge.key"
            key.write_bytes(secrets.token_bytes(1024))
            os.chmod(key, 0o600)
            pids["munged"] = self._spawn("munged", [
                _which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}", f"--log-file={self.log_dir / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
            self._wait("munged", lambda: munge_socket.exists(), pids["munged"], self.log_dir / "munged.log")

            # MariaDB for slurmdbd, TCP on 127.0.0.1 only
            datadir = self.root / "db"
            subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                            "--auth-root-authentication-method=socket", "--skip-test-db"],
                           check=True, capture_output=True, timeout=180)
            pids["mariadbd"] = self._spawn("mariadbd", [
                _which("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={db_socket}",
                f"--port={ports['mariadb']}", "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
                f"--pid-file={self.root / 'run' / 'mariadbd.pid'}", f"--log-error={self.log_dir / 'mariadbd.log'}",
                "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M", "--performance-schema=OFF"])

            def db(sql: str) -> bool:
                return subprocess.run([_which("mariadb"), "--no-defaults", f"--socket={db_socket}", "-u", "root",
                                       "-e", sql], capture_output=True, timeout=30).returncode == 0

            self._wait("mariadbd", lambda: db("SELECT 1"), pids["mariadbd"], self.log_dir / "mariadbd.log")
            assert db(f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{db_password}'; "
                      "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"), "could not create the slurm db user"

            self._write_configs(hostname, ports, munge_socket, db_password)

            pids["slurmdbd"] = self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])

            def cluster_registered() -> bool:
                added = self.run("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME, check=False)
                return added.returncode == 0 or "already exists" in added.stdout + added.stderr

            self._wait("slurmdbd", cluster_registered, pids["slurmdbd"], self.log_dir / "slurmdbd.log")
            self.run("sacctmgr", "-i", "add", "account", self.account, f"cluster={CLUSTER_NAME}",
                     "description=mambapath tests", "organization=mambapath")
            self.run("sacctmgr", "-i", "add", "user", "root", f"account={self.account}", f"cluster={CLUSTER_NAME}")

            pids["slurmctld"] = self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
            self._wait("slurmctld", lambda: "UP" in self.run("scontrol", "ping", check=False).stdout,
                       pids["slurmctld"], self.log_dir / "slurmctld.log")
            pids["slurmd"] = self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node])

            def node_idle() -> bool:
                states = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.split()
                return bool(states) and all(s == "idle" for s in states)

            self._wait("slurmd", node_idle, pids["slurmd"], self.log_dir / "slurmd.log")
        except BaseException:
            self._stop_pids(pids)
            raise
        finally:
            self._namespace_pid = None
        return pids

    def _write_configs(self, hostname: str, ports: dict[str, int], munge_socket: Path, db_password: str) -> None:
        etc, log, state, spool, run = (self.root / s for s in ("etc", "log", "state", "spool", "run"))
        cpus = os.cpu_count() or 1
        auth = f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\n"
        partitions = "\n".join(
            f"PartitionName={name} Nodes={self.node} MaxTime=INFINITE State=UP" + (" Default=YES" if i == 0 else "")
            for i, name in enumerate(self.partitions))
        self.conf.write_text(
            f"ClusterName={CLUSTER_NAME}\n"
            f"SlurmctldHost={hostname}(127.0.0.1)\n"
            f"SlurmctldPort={ports['slurmctld']}\nSlurmdPort={ports['slurmd']}\n"
            "SlurmUser=root\nSlurmdUser=root\n"
            f"{auth}CredType=cred/munge\n"
            f"StateSaveLocation={state}\nSlurmdSpoolDir={spool}\n"
            f"SlurmctldPidFile={run / 'slurmctld.pid'}\nSlurmdPidFile={run / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={log / 'slurmctld.log'}\nSlurmdLogFile={log / 'slurmd.log'}\n"
            "SlurmctldDebug=info\nSlurmdDebug=info\n"
            # no cgroups in a container: track job processes through /proc, bind nothing
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
            "SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
            "ReturnToService=2\n"
            f"MinJobAge={MIN_JOB_AGE_S}\nKillWait=5\nOverTimeLimit=0\nInactiveLimit=0\nWaittime=0\n"
            "GresTypes=gpu\n"
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\nAccountingStoragePort={ports['slurmdbd']}\n"
            # for slurmdbd connections this names the munge socket
            f"AccountingStoragePass={munge_socket}\n"
            "AccountingStorageEnforce=associations\nAccountingStorageTRES=gres/gpu\n"
            "AccountingStoreFlags=job_comment\n"
            # memory is enforced by polling each step's processes (no cgroups in a container):
            # a step above its job's --mem is killed within a second and the job ends FAILED
            "JobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=task=1\n"
            "JobAcctGatherParams=OverMemoryKill\n"
            f"NodeName={self.node} NodeHostname={hostname} NodeAddr=127.0.0.1 CPUs={cpus} "
            f"RealMemory={_real_memory_mb()} Gres=gpu:1 State=UNKNOWN\n"
            f"{partitions}\n"
        )
        # one GPU without a device file: scheduled and accounted, never bound
        (etc / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File=/dev/null\n")
        dbd_conf = etc / "slurmdbd.conf"
        dbd_conf.write_text(
            f"{auth}DbdHost={hostname}\nDbdAddr=127.0.0.1\nDbdPort={ports['slurmdbd']}\nSlurmUser=root\n"
            f"LogFile={log / 'slurmdbd.log'}\nPidFile={run / 'slurmdbd.pid'}\nDebugLevel=info\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={ports['mariadb']}\n"
            f"StorageUser=slurm\nStoragePass={db_password}\nStorageLoc=slurm_acct_db\n"
        )
        os.chmod(dbd_conf, 0o600)  # slurmdbd refuses a readable password file

    def _stop_pids(self, pids: dict[str, int]) -> None:
        """SIGTERM each daemon by its pid (node first, database last), SIGKILL what outlives 20 s."""
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged", "namespaces"):
            pid = pids.get(name)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _shared_root(tmp_path_factory) -> Path:
    """A folder every xdist worker of this session sees (the parent of the workers' base temps)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return shared / "slurm-cluster"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if os.name != "posix" or not Path("/proc/meminfo").exists():
        pytest.skip("the SLURM tests start Slurm daemons and need Linux")
    missing = [c for c in REQUIRED_COMMANDS if _which(c) is None]
    if missing:
        if os.geteuid() != 0:
            pytest.skip(f"{', '.join(missing)} not installed, and installing them needs root "
                        "(tests/slurm/install-slurm.sh)")
        _install_or_skip()
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/slurmdbd as daemons of their own needs root")
    cluster = SlurmCluster(_shared_root(tmp_path_factory))
    cluster.acquire()
    try:
        yield cluster
    finally:
        cluster.release()
