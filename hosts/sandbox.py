"""The sandbox a tenant's plugin host runs in, built in layers before a line of the tenant's code is imported.

Three processes are involved (see SECURITY.md for the threat model):

* the **kernel** (root) prepares a :class:`Policy`: the tenant's uid, its 0700 scratch folder, the folder of
  the host's sockets, the cgroups, and the paths the host may see; then it spawns the launcher;
* the **launcher** (``python -m swiftk.hosts.sandbox launch POLICY -- COMMAND``, a small interpreter with no
  threads, so forking is safe) joins the cgroups, unshares the mount, network, pid, ipc and uts namespaces,
  and forks the host. It stays outside the new pid namespace, dies with the kernel and takes the host with it;
* the **host** is pid 1 of the new pid namespace. Before it execs the host program it builds a new root: a
  tmpfs holding read-only binds of the interpreter, the installed packages, swiftk's code, the tenant's plugin
  files and data, a read-write bind of the scratch folder, a few devices and a fresh ``/proc``; everything
  else (``/etc/shadow``, other tenants, ``/tmp``, ``/dev/shm``, the kernel's processes) does not exist there.
  The host program imports torch, zmq and the seccomp binding as root, then calls :func:`confine`: rlimits,
  the tenant's uid and gid (all capabilities gone), ``no_new_privs``, Landlock (read-only everywhere but
  scratch, no TCP, no abstract Unix sockets or signals outside), and a seccomp filter (no exec, fork, ptrace,
  mount, unshare, bpf...; Unix sockets only). Only then does it import the tenant's plugins.

What a host actually got is read back from ``/proc/self/status`` and reported in the handshake
(``swiftk sandbox doctor`` prints it). Linux only; the constants below are the kernel's ABI.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import select
import signal
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LAYERS = ("uid", "namespaces", "rlimits", "seccomp", "landlock", "cgroup", "no_new_privs")
CORE = ("uid", "namespaces", "seccomp", "rlimits")  # "sandbox" refuses to start with fewer, unless told

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_THREAD = 0x00010000
NAMESPACES = {"mnt": CLONE_NEWNS, "net": CLONE_NEWNET, "pid": CLONE_NEWPID, "ipc": CLONE_NEWIPC,
              "uts": CLONE_NEWUTS}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
DEVICES = ("null", "zero", "full", "random", "urandom")

# Landlock access rights, by the ABI version that introduced them.
FS_READ_FILE, FS_READ_DIR = 1 << 2, 1 << 3
FS_WRITE = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 12)  # write, rm dir/file, mkdir, mkreg, symlink
FS_ABI1 = (1 << 13) - 1  # execute ... make_sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_FILE = (1 << 0) | (1 << 1) | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # the rights a rule on a file may carry
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1
RULE_PATH_BENEATH = 1

# Denied outright (EPERM). Socket families, clone flags and tty ioctls are filtered by argument below.
DENIED_SYSCALLS = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_getfd", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr", "unshare", "setns", "bpf", "perf_event_open", "keyctl", "add_key",
    "request_key", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
    "syslog", "quotactl", "quotactl_fd", "open_by_handle_at", "name_to_handle_at", "iopl", "ioperm",
    "lookup_dcookie", "fanotify_init", "personality", "mknod", "mknodat", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "vhangup", "landlock_create_ruleset",
    "landlock_add_rule", "landlock_restrict_self", "seccomp", "process_madvise", "set_mempolicy_home_node",
)


class SandboxError(Exception):
    """A layer could not be applied; the message names it and the system call that failed."""


@dataclass(frozen=True)
class Policy:
    """Everything the launcher and the host need to confine one tenant's host (travels as JSON in argv)."""

    tenant: str
    uid: int
    gid: int
    layers: list[str]  # the layers to apply; the kernel checked that the machine has them
    scratch: str  # read-write, 0700, owned by uid; the host's cwd, HOME and TMPDIR
    root: str  # an empty folder the launcher mounts the new root on (in its own mount namespace)
    readable: list[str] = field(default_factory=list)  # bound read-only at the same path
    writable: list[str] = field(default_factory=list)  # bound read-write (scratch, the socket folder)
    memory_mb: int = 0  # RLIMIT_AS beyond what the host mapped before the tenant's code (address_space_limit); 0: none
    open_files: int = 256
    file_size_mb: int = 1024
    cpu_seconds_total: int = 0  # RLIMIT_CPU over the host's life; 0: none
    cgroups: list[str] = field(default_factory=list)  # cgroup folders to join (one per controller)
    kernel_ns: dict[str, int] = field(default_factory=dict)  # the kernel's namespace inodes, to compare

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls(**json.loads(text))


# -- system calls ----------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(code)} (errno {errno.errorcode.get(code, code)})")
    return result


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)),
           f"mount {source or ''} on {target}")


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def namespace_ids() -> dict[str, int]:
    """This process's namespace inodes (equal ids: the same namespace)."""
    ids = {}
    for name in NAMESPACES:
        try:
            ids[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            continue
    return ids


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    version = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_ruleset(read: list[str], write: list[str]) -> tuple[int, int]:
    """A Landlock ruleset (its fd, and the ABI) allowing reads beneath ``read``, reads and writes beneath
    ``write``, no execution, no TCP at all (ABI >= 4), and no abstract Unix socket or signal that leaves the
    sandbox (ABI >= 6). Built as root; enforced by :func:`landlock_restrict`."""
    abi = landlock_abi()
    if abi < 1:
        raise SandboxError("landlock: this kernel has no Landlock (CONFIG_SECURITY_LANDLOCK, lsm=landlock)")
    handled = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) \
        | (FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    fd = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                              ctypes.c_uint32(0)), "landlock_create_ruleset")
    writing = FS_READ_FILE | FS_READ_DIR | FS_WRITE | (FS_TRUNCATE if abi >= 3 else 0) | (FS_REFER if abi >= 2 else 0)
    for paths, access in ((read, FS_READ_FILE | FS_READ_DIR), (write, writing)):
        for path in paths:
            target = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                allowed = access if os.path.isdir(path) else access & FS_FILE
                rule = _PathBeneath(allowed & handled, target)
                _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, fd, RULE_PATH_BENEATH, ctypes.byref(rule),
                                     ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(target)
    return fd, abi


def landlock_restrict(fd: int) -> None:
    _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, fd, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(fd)


def seccomp_filter() -> Any:
    """The host's seccomp filter (libseccomp through pyseccomp): allow by default, deny what a plugin has no
    business doing. Threads (clone with CLONE_THREAD) stay allowed; clone3 answers ENOSYS so that libc falls
    back to clone, whose flags a filter can see."""
    import pyseccomp

    deny = pyseccomp.ERRNO(errno.EPERM)
    rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) >= 0:  # unknown on this architecture: skip
            rules.add_rule(deny, name)
    for name in ("socket", "socketpair"):
        rules.add_rule(deny, name, pyseccomp.Arg(0, pyseccomp.NE, socket.AF_UNIX))
    rules.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_THREAD, 0))
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    for request in (TIOCSTI, TIOCLINUX):  # typing into the kernel's terminal
        rules.add_rule(deny, "ioctl", pyseccomp.Arg(1, pyseccomp.EQ, request))
    return rules


# -- the launcher ----------------------------------------------------------------------------------------------

def launch(policy: Policy, command: list[str]) -> int:
    """Join the cgroups, unshare the namespaces, fork the host (pid 1 of the new pid namespace) and wait: for
    the host, which it mirrors (exit code or signal), or for the kernel's death, which kills the host."""
    kernel = os.getppid()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing host leaves no core file of the tenant's data
    for folder in policy.cgroups:
        Path(folder, "cgroup.procs").write_text(str(os.getpid()))
    if "namespaces" in policy.layers:
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        unprivileged = os.geteuid() != 0
        if unprivileged:  # a user namespace grants the mounts; the uid layer is then unavailable
            uid, gid = os.geteuid(), os.getegid()
            _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
        _check(_libc.unshare(flags), "unshare(mnt|net|pid|ipc|uts)")
    launcher = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if "namespaces" not in policy.layers and os.getppid() != launcher:
                os._exit(1)
            if "namespaces" in policy.layers:
                build_root(policy)
            os.chdir(policy.scratch)
            try:
                os.execv(command[0], command)
            except OSError as exc:
                raise SandboxError(f"cannot run {command[0]} inside its root: {exc.strerror} (is the interpreter "
                                   f"under a folder the sandbox binds?)") from None
        except BaseException as exc:
            print(f"swiftk sandbox: tenant '{policy.tenant}': could not start its host: {exc}", file=sys.stderr,
                  flush=True)
            os._exit(70)
    return supervise(child, kernel)


def supervise(child: int, kernel: int) -> int:
    """Wait for ``child`` without polling: pidfds of the child and the kernel. SIGTERM kills the child."""
    def kill_child(*_: object) -> None:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, kill_child)
    child_fd = os.pidfd_open(child)
    try:
        kernel_fd = os.pidfd_open(kernel)
    except ProcessLookupError:  # the kernel is already gone
        kill_child()
        kernel_fd = child_fd
    waiting = select.poll()
    waiting.register(child_fd, select.POLLIN)
    waiting.register(kernel_fd, select.POLLIN)
    while True:
        try:
            ready = {fd for fd, _ in waiting.poll()}
        except InterruptedError:
            continue
        if kernel_fd in ready and kernel_fd != child_fd:
            kill_child()
        if child_fd in ready:
            break
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):  # mirror the host's death, so the kernel sees which signal it was
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    return os.waitstatus_to_exitcode(status)


def build_root(policy: Policy) -> None:
    """In the new mount namespace: a tmpfs root with only the policy's paths bound into it, then pivot_root.
    Runs in the host process (pid 1 of its pid namespace) before it execs the host program."""
    os.umask(0o022)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates back to the machine
    root = policy.root
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    writable = set(policy.writable)
    for path in sorted({*policy.readable, *policy.writable}, key=lambda p: (p.count("/"), p)):
        bind(path, root + path, read_only=path not in writable)
    for name in os.listdir("/"):  # /bin -> usr/bin and friends on merged-/usr systems
        if os.path.islink(f"/{name}") and not os.path.lexists(f"{root}/{name}"):
            os.symlink(os.readlink(f"/{name}"), f"{root}/{name}")
    os.makedirs(f"{root}/dev", exist_ok=True)
    for device in DEVICES:
        Path(f"{root}/dev/{device}").touch()
        mount(f"/dev/{device}", f"{root}/dev/{device}", None, MS_BIND)
    os.makedirs(f"{root}/proc", exist_ok=True)
    # Before the old root goes: a user namespace may only mount a proc while a full one is visible.
    mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this pid namespace's processes
    os.makedirs(f"{root}/.old", exist_ok=True)
    machine = platform.machine()
    if machine not in SYS_PIVOT_ROOT:
        raise SandboxError(f"pivot_root: unknown system call number on {machine}")
    _check(_libc.syscall(SYS_PIVOT_ROOT[machine], os.fsencode(root), os.fsencode(f"{root}/.old")), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount the old root")
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def bind(source: str, target: str, read_only: bool) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):  # (it exists when a folder bound earlier holds it)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Path(target).touch()
    mount(source, target, None, MS_BIND)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0))


# -- inside the host ---------------------------------------------------------------------------------------------

def confine(policy: Policy) -> dict[str, str]:
    """Apply the in-process layers to this host, in the only order that works: rlimits and the Landlock ruleset
    as root, then the tenant's uid, no_new_privs, Landlock, seccomp. Returns what the host got, as read back."""
    layers = set(policy.layers)
    rules = seccomp_filter() if "seccomp" in layers else None  # libseccomp is loaded while files are readable
    if "rlimits" in layers:
        limits = {resource.RLIMIT_NOFILE: policy.open_files, resource.RLIMIT_FSIZE: policy.file_size_mb << 20,
                  resource.RLIMIT_CORE: 0}
        if policy.memory_mb:
            limits[resource.RLIMIT_AS] = address_space_limit(policy.memory_mb)
        if policy.cpu_seconds_total:
            limits[resource.RLIMIT_CPU] = policy.cpu_seconds_total
        for which, value in limits.items():
            _, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
    ruleset, abi = None, 0
    if "landlock" in layers:
        ruleset, abi = landlock_ruleset(["/"], [policy.scratch, "/dev/null"])
    if "uid" in layers:
        os.setgroups([])
        os.setresgid(policy.gid, policy.gid, policy.gid)
        os.setresuid(policy.uid, policy.uid, policy.uid)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a change of credentials cleared it
    if {"no_new_privs", "landlock", "seccomp"} & layers:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    if ruleset is not None:
        landlock_restrict(ruleset)
    if rules is not None:
        rules.load()
    return report(policy, abi)


def mapped_bytes() -> int:
    """The address space this process has mapped so far (``VmSize``): the interpreter, torch and, with a CUDA
    build, its CUDA libraries, which map gigabytes before any tensor exists."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) << 10
    return 0


def address_space_limit(memory_mb: int) -> int:
    """``RLIMIT_AS`` for a host whose plugins may map ``memory_mb`` MiB: beyond what the host mapped before any
    plugin code ran. An absolute limit would depend on the torch build: a CUDA build's libraries alone map more
    than a typical limit, and its threads then cannot get stacks (seen on an H200: zmq could not start)."""
    return mapped_bytes() + (memory_mb << 20)


def report(policy: Policy, landlock: int) -> dict[str, str]:
    """What this process actually runs under, read back from the kernel's view of it."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    status = {k: v.strip() for k, v in status.items()}
    got: dict[str, str] = {}
    uids = status.get("Uid", "").split()
    if uids and all(u == str(policy.uid) for u in uids) and int(status.get("CapEff", "1"), 16) == 0:
        got["uid"] = f"uid {policy.uid} gid {policy.gid}, no capabilities"
    mine = namespace_ids()
    fresh = [name for name, inode in mine.items() if policy.kernel_ns.get(name) not in (None, inode)]
    if set(fresh) >= set(NAMESPACES) and os.getpid() == 1:
        got["namespaces"] = f"new {' '.join(sorted(fresh))}; pid 1 of its own"
    if "rlimits" in policy.layers:
        soft_as, _ = resource.getrlimit(resource.RLIMIT_AS)
        nofile, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        memory = "unlimited" if soft_as == resource.RLIM_INFINITY else f"{soft_as >> 20} MiB"
        got["rlimits"] = f"address space {memory}, {nofile} files, no core dumps"
    if status.get("Seccomp") == "2":
        got["seccomp"] = f"filter mode, {status.get('Seccomp_filters', '?')} filter(s)"
    if status.get("NoNewPrivs") == "1":
        got["no_new_privs"] = "set"
    if landlock:
        got["landlock"] = f"ABI {landlock}: read-only but scratch, no TCP" + (", scoped" if landlock >= 6 else "")
    cgroups = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    joined = [f"{c[1] or 'v2'}" for c in cgroups if len(c) == 3 and "swiftk-" in c[2]]
    if joined:
        got["cgroup"] = " ".join(sorted(joined))
    return got


# -- probing the machine (swiftk sandbox doctor) -------------------------------------------------------------------

def probe() -> dict[str, str | None]:
    """Which layers this machine can give a host: layer -> None (available) or why not. Run in a throwaway
    process (``python -m swiftk.hosts.sandbox probe``): it unshares namespaces and loads filters on itself."""
    problems: dict[str, str | None] = {}
    try:  # first: importing it runs ldconfig, which a pid namespace's first child would take down with it
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError):
        pass
    root = os.geteuid() == 0
    problems["uid"] = None if root else f"switching to a tenant's uid needs root (this runs as uid {os.geteuid()})"
    problems["rlimits"] = None
    problems["cgroup"] = None  # checked by the kernel, which creates them
    try:
        if not root:
            _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
               "unshare(mnt|net|pid|ipc|uts)")
        problems["namespaces"] = None
    except (SandboxError, OSError) as exc:
        problems["namespaces"] = f"{exc} (a container without CAP_SYS_ADMIN or user namespaces)"
    abi = landlock_abi()
    problems["landlock"] = None if abi else "the kernel has no Landlock (needs Linux >= 5.13 with lsm=landlock)"
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        problems["no_new_privs"] = None
    except SandboxError as exc:
        problems["no_new_privs"] = str(exc)
    try:
        seccomp_filter().load()
        problems["seccomp"] = None
    except ImportError:
        problems["seccomp"] = "the pyseccomp package is not installed (pip install pyseccomp)"
    except (OSError, RuntimeError, ValueError) as exc:
        problems["seccomp"] = f"loading a filter failed: {exc} (is libseccomp2 installed? seccomp disabled?)"
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        print(json.dumps(probe()))
        return 0
    if len(argv) >= 4 and argv[0] == "launch" and argv[2] == "--":
        return launch(Policy.from_json(argv[1]), argv[3:])
    print("usage: python -m swiftk.hosts.sandbox probe | launch POLICY_JSON -- COMMAND...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
