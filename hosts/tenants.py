"""The kernel's side of sandboxed hosts: tenants, their uids and folders, the layers this machine can give a
host, and the cgroups that bound its memory, processes and CPU. The host's side is ``swiftk.hosts.sandbox``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import site
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from swiftk.hosts.sandbox import CORE, LAYERS, Policy, namespace_ids

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
PACKAGES = ("swiftk", "swiftk.contracts", "swiftk.hosts", "swiftk.shm", "swiftk.plugins", "swiftk.kernel",
            "swiftk.native")
# What a host needs from /etc and /sys; nothing else of the machine's configuration is visible.
SYSTEM_FILES = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/ld.so.conf",
                "/etc/ld.so.conf.d", "/etc/localtime", "/sys/devices/system/cpu")


@dataclass(frozen=True)
class Tenant:
    """One tenant, as ``[tenants.NAME]`` configures it (uid and scratch resolved by the kernel)."""

    name: str
    uid: int
    scratch: str
    data: list[str] = field(default_factory=list)
    memory_mb: int = 2048
    cpu_seconds_per_call: float | None = None
    cpu_cores: float = 1.0
    pids_max: int = 64
    open_files: int = 256
    file_size_mb: int = 1024
    cpu_seconds_total: int = 0

    @property
    def gid(self) -> int:
        return self.uid


class SandboxUnavailable(Exception):
    """This machine cannot give a tenant's host the layers the config requires."""


# -- which layers ------------------------------------------------------------------------------------------------

_probed: dict[str, str | None] | None = None


def machine_layers() -> dict[str, str | None]:
    """Layer -> None when this machine can apply it, else why not. The namespaces, seccomp and no_new_privs
    checks run in a throwaway process (they change the process that tries them); cgroups are tried here."""
    global _probed
    if _probed is None:
        result = subprocess.run([sys.executable, "-m", "swiftk.hosts.sandbox", "probe"], capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
        try:
            probed = json.loads(result.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            why = (result.stderr.strip().splitlines() or ["no output"])[-1]
            probed = {layer: f"the probe process failed: {why}" for layer in LAYERS}
        probed["cgroup"] = cgroup_problem()
        _probed = probed
    return dict(_probed)


def plan(require: list[str] | None) -> tuple[list[str], list[str], list[str]]:
    """(layers a host gets, missing layers that are required, missing layers that are not). ``require`` None
    means the core set; every layer the machine has is applied either way."""
    available = machine_layers()
    wanted = list(CORE) if require is None else list(require)
    layers = [layer for layer in LAYERS if available.get(layer) is None]
    missing = [f"{layer}: {available[layer]}" for layer in wanted if available.get(layer) is not None]
    optional = [f"{layer}: {available[layer]}" for layer in LAYERS
                if layer not in wanted and available.get(layer) is not None]
    return layers, missing, optional


def unavailable_message(missing: list[str], require: list[str] | None) -> str:
    which = "the core layers (uid, namespaces, seccomp, rlimits)" if require is None else "[sandbox] require"
    return (f"sandbox: this machine cannot give tenant hosts {which}: " + "; ".join(missing) + ". Run swiftk as "
            "root on Linux with pyseccomp installed (`swiftk sandbox doctor` shows each layer), or, for code you "
            "trust, list fewer layers in [sandbox] require.")


# -- uids and folders ---------------------------------------------------------------------------------------------

def tenant_uid(name: str, base: int, taken: set[int]) -> int:
    """A stable uid for ``name`` in [base, base + 4096): the same every run (the scratch folder keeps its owner),
    skipping uids already given to another tenant or to an account of this machine."""
    start = zlib.crc32(name.encode()) % 4096
    for step in range(4096):
        uid = base + (start + step) % 4096
        if uid not in taken and not account(uid):
            return uid
    raise SandboxUnavailable(f"no free uid in [{base}, {base + 4096}) for tenant '{name}'")


def account(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def make_private(path: Path, uid: int) -> None:
    """``path`` exists, is a real folder (not a link), belongs to ``uid`` and only it (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise SandboxUnavailable(f"{path} must be a folder, not a link")
    if os.geteuid() == 0:
        os.chown(path, uid, uid)
    path.chmod(0o700)


def claim_scratch(path: Path, uid: int) -> None:
    """Make ``path`` the tenant's scratch folder: new, or already the tenant's, or an empty folder. Anything else
    (a system folder, another tenant's, a file, a link) is refused: the kernel would hand it to the tenant."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise SandboxUnavailable(f"scratch {path} is a link or a file; give the tenant a folder of its own")
    if path.exists():
        owner = path.stat().st_uid
        if owner != uid and any(path.iterdir()):
            raise SandboxUnavailable(f"scratch {path} holds files and belongs to uid {owner}, not to the tenant's uid "
                                     f"{uid}; a tenant gets a new or empty folder (or its own)")
    make_private(path, uid)


def visible_paths() -> list[str]:
    """The interpreter, the installed packages and swiftk's own code: what every tenant's host may read."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            # swiftk/kernel -> ../kernel: bind the links' folder and their targets, or the links dangle inside
            paths.update(spec.submodule_search_locations)
            paths.update(os.path.realpath(p) for p in spec.submodule_search_locations)
    # /bin -> usr/bin and friends are recreated as links inside the sandbox; a real folder is bound.
    paths.update(p for p in SYSTEM_FILES if os.path.exists(p) and not (p.count("/") == 1 and os.path.islink(p)))
    paths.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p))
    existing = sorted(p for p in paths if os.path.exists(p))
    return [p for p in existing if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in existing)]


# -- cgroups ---------------------------------------------------------------------------------------------------------

def own_cgroup(controller: str) -> Path | None:
    """This process's cgroup folder for a v1 controller, when that hierarchy is mounted and writable."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            folder = CGROUP_ROOT / controller / path.lstrip("/")
            return folder if folder.is_dir() and os.access(folder, os.W_OK) else None
    return None


def cgroup_problem() -> str | None:
    missing = [c for c in ("memory", "pids", "cpu") if own_cgroup(c) is None]
    if not missing:
        return None
    return (f"cgroup v1 controllers {', '.join(missing)} are not mounted writable under {CGROUP_ROOT} "
            f"(a read-only container, or cgroup v2 only); rlimits and the per-call deadline still apply")


class Cgroups:
    """One host's cgroups (v1): memory limit, process count, CPU quota, and CPU time for per-call budgets."""

    def __init__(self, name: str, tenant: Tenant) -> None:
        self.folders: dict[str, Path] = {}
        settings = {
            "memory": {"memory.limit_in_bytes": str(tenant.memory_mb << 20)},
            "pids": {"pids.max": str(tenant.pids_max)},
            "cpu": {"cpu.cfs_period_us": str(CPU_PERIOD_US),
                    "cpu.cfs_quota_us": str(max(1000, int(tenant.cpu_cores * CPU_PERIOD_US)))},
            "cpuacct": {},
        }
        try:
            for controller, values in settings.items():
                parent = own_cgroup(controller)
                if parent is None:
                    continue
                folder = parent / name
                folder.mkdir(exist_ok=True)
                self.folders[controller] = folder
                for key, value in values.items():
                    (folder / key).write_text(value)
        except OSError:
            self.remove()
            raise

    def cpu_seconds(self) -> float | None:
        """CPU time used by every process the host ever ran, or None without a cpuacct cgroup."""
        folder = self.folders.get("cpuacct")
        if folder is None:
            return None
        try:
            return int((folder / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        folder = self.folders.get("memory")
        if folder is None:
            return 0
        try:
            for line in (folder / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, timeout_s: float = 5.0) -> None:
        """Remove the folders once their processes are gone: a killed host takes a moment to exit, and until it
        has, it is listed in ``cgroup.procs``."""
        end = time.monotonic() + timeout_s
        for folder in self.folders.values():
            while time.monotonic() < end:
                try:
                    if not (folder / "cgroup.procs").read_text().strip():
                        break
                except OSError:
                    break
                time.sleep(0.01)
        for folder in self.folders.values():
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self.folders.clear()


# -- one host's sandbox ----------------------------------------------------------------------------------------------

class Sandbox:
    """What the kernel prepares for one sandboxed host and keeps across its restarts: the socket folder (only the
    tenant's uid may enter), the mount point of its root, its cgroups, and the policy the launcher receives."""

    def __init__(self, tenant: Tenant, sources: list[str], layers: list[str], name: str) -> None:
        self.tenant, self.layers = tenant, layers
        # Short (Unix socket paths hold 107 bytes) and named after the kernel, so that leftovers can be found.
        self.folder = Path(tempfile.mkdtemp(prefix=f"swiftk-sbx-{os.getpid()}-"))
        try:
            make_private(self.folder, tenant.uid)
            (self.folder / "root").mkdir()
            claim_scratch(Path(tenant.scratch), tenant.uid)
            self.cgroups = Cgroups(name, tenant) if "cgroup" in layers else None
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        files = [str(Path(s).resolve()) for s in sources if Path(s).exists()]
        self.policy = Policy(
            tenant.name, tenant.uid, tenant.gid, [layer for layer in layers if layer != "cgroup"] +
            (["cgroup"] if self.cgroups and self.cgroups.folders else []), tenant.scratch, str(self.folder / "root"),
            # The socket folder is read-only inside: connecting to a socket needs no write access to its mount.
            readable=sorted({*visible_paths(), *files, *tenant.data, str(self.folder)}), writable=[tenant.scratch],
            memory_mb=tenant.memory_mb, open_files=tenant.open_files, file_size_mb=tenant.file_size_mb,
            cpu_seconds_total=tenant.cpu_seconds_total,
            cgroups=[str(f) for f in self.cgroups.folders.values()] if self.cgroups else [],
            kernel_ns=namespace_ids())

    def endpoint(self, suffix: str) -> str:
        return f"ipc://{self.folder}/{suffix}"

    def own_socket(self, endpoint: str) -> None:
        """The tenant's uid may connect to a socket the kernel bound (connecting needs write permission)."""
        path = endpoint.removeprefix("ipc://")
        if os.geteuid() == 0:
            os.chown(path, self.tenant.uid, self.tenant.gid)

    def command(self, host_command: list[str]) -> list[str]:
        policy = self.policy.to_json()
        return [sys.executable, "-m", "swiftk.hosts.sandbox", "launch", policy, "--", *host_command,
                "--sandbox", policy]

    def env(self, token: str) -> dict[str, str]:
        """Nothing of the kernel's environment (it may hold credentials), but what a Python host needs."""
        keep = {k: os.environ[k] for k in ("LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                if k in os.environ}
        return {**keep, "PATH": "/usr/bin:/bin", "HOME": self.tenant.scratch, "TMPDIR": self.tenant.scratch,
                "USER": self.tenant.name, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONDONTWRITEBYTECODE": "1",
                "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "SWIFTK_HOST_TOKEN": token}

    def close(self) -> None:
        if self.cgroups is not None:
            self.cgroups.remove()
        shutil.rmtree(self.folder, ignore_errors=True)
