"""A real Slurm cluster on this machine, for the tests of ``launchers/`` and ``slurm/`` (FACTS.md).

Debian's Slurm 22.05 with munge: ``munged`` (as the munge user, with its own key and socket),
``slurmctld`` and one ``slurmd`` per node, ``node1`` .. ``node4``, all on 127.0.0.1 on ports of
their own. Everything lives in one directory (config, state, spool, logs, the munge key); the
machine's own ``/etc/slurm`` and ``/etc/munge`` are not touched. Commands reach this cluster
through ``SLURM_CONF`` in :attr:`LocalSlurm.env`.

The nodes are described as H100 nodes (112 CPUs, 8 GPUs, 2 TB) so that ``sbatch --test-only``
can judge the real layout of ``slurm/distill_70b_to_8b.sh``: ``SlurmdParameters=config_overrides``
makes slurmd take the node description from slurm.conf instead of the hardware, and the GPUs are
8 empty files named in gres.conf. Jobs that ask for no GPU run as on any CPU machine.

Requeue: a requeued job becomes eligible again after the job credential's lifetime (default
120 s); ``cred_expire=10`` makes that 11 s here. Job ids start at a random number below 9000, so
that two test sessions on one machine do not derive the same ``MASTER_PORT`` from them.

Name resolution: the node names must resolve (``MASTER_ADDR`` is the first node's name). When
they do not, one line ``127.0.0.1 node1 node2 node3 node4`` is added to ``/etc/hosts`` and
removed again by :meth:`LocalSlurm.stop`, which also cancels every job and stops every daemon
it started, by pid.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from helpers.ports import free_ports

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
"""Debian packages that hold the daemons and the client commands."""
COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "munged")
NODES = ("node1", "node2", "node3", "node4")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
HOSTS_FILE = Path("/etc/hosts")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed here, or the node names cannot be made to resolve (the tests are
    skipped with this message)."""


class ClusterError(RuntimeError):
    """A daemon did not come up (the tests fail with its log)."""


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def ensure_installed() -> None:
    """Install the Debian packages when a command is missing (root and apt-get needed).

    Raises:
        ClusterUnavailable: not root, no apt-get, or the installation failed.
    """
    if not missing_commands():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(
            f"Slurm is not installed ({', '.join(missing_commands())} missing) and cannot be installed here "
            f"(needs root and apt-get): apt-get install -y {' '.join(PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n{proc.stderr[-2000:]}")
    if missing_commands():
        raise ClusterUnavailable(f"still missing after apt-get install: {', '.join(missing_commands())}")


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name).startswith("127.")
    except OSError:
        return False


class LocalSlurm:
    """munged + slurmctld + one slurmd per node, all state under ``base``.

    Args:
        base: an empty directory for configuration, state, spool and logs. It must be reachable by
            the munge user (munged refuses a socket directory others cannot enter), so not under
            pytest's private ``/tmp/pytest-of-root``.
        cwd: where :meth:`run` runs commands (sbatch submits from there).
    """

    def __init__(self, base: Path, cwd: Path | None = None) -> None:
        self.base = base
        self.cwd = cwd
        self.conf = base / "slurm.conf"
        self.logs = base / "log"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._hosts_line: str | None = None

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Configure and start the daemons; returns once every node is idle.

        Raises:
            ClusterUnavailable: the node names cannot be made to resolve.
            ClusterError: a daemon did not come up (its log is in the message).
        """
        try:
            self._write_config()
            self._add_hosts()
            self._start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_idle(timeout=60)
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        for sub in ("state", "spool", "log", "tmp", "munge", "gpus"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        for i in range(8):
            (self.base / "gpus" / f"nvidia{i}").touch()
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        b = self.base
        nodes = "\n".join(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=112 Sockets=2 "
            "CoresPerSocket=56 ThreadsPerCore=1 RealMemory=2000000 Gres=gpu:8 State=UNKNOWN"
            for node, port in zip(NODES, node_ports, strict=True)
        )
        self.conf.write_text(
            f"""# written by tests/helpers/slurm_cluster.py
ClusterName=dcodtest
FirstJobId={random.randrange(1000, 9000)}
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={b}/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
PlugStackConfig={b}/plugstack.conf
TmpFS={b}/tmp
ReturnToService=2
MinJobAge=900
KillWait=10
{nodes}
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        (b / "plugstack.conf").write_text("")
        (b / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName=node[1-4] Name=gpu File={b}/gpus/nvidia[0-7]\n"
        )

    def _add_hosts(self) -> None:
        if all(_resolves_to_loopback(node) for node in NODES):
            return
        line = f"127.0.0.1 {' '.join(NODES)}  # nemo_dcod tests/slurm (pid {os.getpid()})"
        try:
            with HOSTS_FILE.open("a") as f:
                f.write(("" if HOSTS_FILE.read_text().endswith("\n") else "\n") + line + "\n")
        except OSError as exc:
            raise ClusterUnavailable(
                f"the node names do not resolve and {HOSTS_FILE} is not writable: {exc}"
            ) from None
        self._hosts_line = line
        if not all(_resolves_to_loopback(node) for node in NODES):
            raise ClusterUnavailable(f"{', '.join(NODES)} do not resolve to 127.0.0.1 even with {HOSTS_FILE}")

    def _start_munge(self) -> None:
        munge = self.base / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        munge.chmod(0o755)  # munged: everyone must be able to reach the socket
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={munge}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ],
            user="munge",
        )
        deadline = time.monotonic() + 20
        while not (munge / "munge.socket").exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError("munged did not create its socket in 20 s:\n" + self._tail("munged"))
            time.sleep(0.05)

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = (self.logs / f"{name}.out").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, user=user)
        self._procs.append((name, proc))

    def _tail(self, name: str, lines: int = 30) -> str:
        out = []
        for path in (self.logs / f"{name}.out", self.logs / f"{name}.log"):
            if path.exists():
                out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with status {proc.returncode}:\n{self._tail(name)}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            self._check_alive()
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = proc.stdout.strip()
            lines = states.splitlines()
            if len(lines) == len(NODES) and all(line.split()[1] == "idle" for line in lines):
                return
            time.sleep(0.2)
        raise ClusterError(f"nodes not idle after {timeout:.0f} s:\n{states}\n{self._tail('slurmctld')}")

    # ------------------------------------------------------------------ use

    def run(
        self,
        cmd: list[str],
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float | None = 120,
    ) -> subprocess.CompletedProcess[str]:
        """``cmd`` against this cluster (SLURM_CONF set, plus ``env``), output captured as text."""
        proc = subprocess.run(
            cmd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.cwd,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields of ``job_id`` (finished jobs stay for MinJobAge=900 s)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until ``job_id`` has finished (not pending, running, requeued or completing)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in FINISHED:
                return info
            if time.monotonic() > deadline:
                self.run(["scancel", str(job_id)], check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s: {info}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Cancel every job, stop every daemon started here (by pid), remove the /etc/hosts line."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._procs):
            self.run(["scancel", "--user", "root", "--full"], check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                proc = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=30)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.5)
        for name, proc in reversed(self._procs):  # slurmds, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            del name
        self._procs.clear()
        if self._hosts_line is not None:
            with contextlib.suppress(OSError):
                kept = [line for line in HOSTS_FILE.read_text().splitlines() if line != self._hosts_line]
                HOSTS_FILE.write_text("".join(f"{line}\n" for line in kept))
            self._hosts_line = None
