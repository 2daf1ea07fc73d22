"""The attack suite: tenant mallory's plugin (attacks.py) tries to escape its sandbox while tenant bob's plugin and
mallory's own second plugin keep working. Each attack must be stopped, checked from inside (the error the plugin
got) and from outside (the listener saw nothing, the files are unchanged, the kernel lives)."""

from __future__ import annotations

import os
import select
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from swiftk.contracts.errors import HostDeadError, PluginError
from swiftk.contracts.types import Batch
from swiftk.hosts import tenants
from swiftk.hosts.group import HostGroup, HostSettings, HostSpec, Policy

from .conftest import sandbox_leftovers

HERE = Path(__file__).parent
SECRET = "swiftk-test-secret-3f9a"
BENIGN = '''
from pathlib import Path
from swiftk.contracts import hookimpl, register_reward

@register_reward("{name}")
class Reader:
    @hookimpl
    def swiftk_reward_compute(self, prompts, completions, references, state):
        rows = Path("{data}").read_text().splitlines()
        return {{"rows": [float(len(rows))] * len(completions)}}
'''


class Listener:
    """TCP, UDP, a pathname Unix socket (mode 0666) and an abstract one on the kernel's side. An attack is judged by
    what reached it (``received``), not by the error the attacker saw: nothing accepts or closes a connection while
    an attack runs, so an attacker cannot get a broken pipe from a connection that in fact succeeded."""

    def __init__(self, folder: Path) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.path = str(folder / "service.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.path)
        os.chmod(self.path, 0o666)
        self.unix.listen()
        self.abstract_name = f"swiftk-test-{os.getpid()}-{id(self)}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + self.abstract_name)
        self.abstract.listen()

    def received(self) -> list[tuple[str, bytes]]:
        """Every contact since the last call, with the bytes it sent. A connection an attacker made is complete
        (in the listening socket's queue) and its bytes are buffered before its connect and send return, and a
        datagram is queued before its sendto returns, so what an attack did is all here when the attack has
        answered."""
        contacts = []
        while True:
            ready, _, _ = select.select([self.tcp, self.unix, self.abstract, self.udp], [], [], 0.05)
            if not ready:
                return contacts
            for sock in ready:
                if sock is self.udp:
                    data, _ = self.udp.recvfrom(100)
                    contacts.append(("udp", data))
                    continue
                conn, _ = sock.accept()
                conn.settimeout(5)
                with conn:
                    data = b""
                    while chunk := conn.recv(100):  # the attacker has closed its end: EOF follows its bytes
                        data += chunk
                contacts.append((repr(sock.getsockname()), data))

    def close(self) -> None:
        for sock in (self.tcp, self.udp, self.unix, self.abstract):
            sock.close()


class World:
    """Tenants mallory (attacks.py and a benign reader, one host each) and bob (a benign reader), started once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        for name in ("mallory", "bob"):
            (tmp / "data" / name).mkdir(parents=True)
            (tmp / "data" / name / "rows.txt").write_text(f"{name}'s private row\n" * 3)
        self.plugin = tmp / "code" / "attacks.py"
        self.plugin.parent.mkdir()
        shutil.copy(HERE / "attacks.py", self.plugin)
        readers = {}
        for name in ("mallory", "bob"):
            readers[name] = tmp / "code" / f"{name}_reader.py"
            readers[name].write_text(BENIGN.format(name=f"{name}_rows", data=tmp / "data" / name / "rows.txt"))
        layers, _, _ = tenants.plan(None)
        self.mallory, self.bob = (
            tenants.Tenant(name, uid, str(tmp / "scratch" / name), [str(tmp / "data" / name)], memory_mb=1024,
                           cpu_seconds_per_call=2.0, pids_max=32)
            for name, uid in (("mallory", 61901), ("bob", 61902)))
        (tmp / "scratch" / "bob").mkdir(parents=True)
        (tmp / "scratch" / "bob" / "notes.txt").write_text("bob's scratch")
        os.chown(tmp / "scratch" / "bob", self.bob.uid, self.bob.gid)  # a scratch folder bob used before
        specs = [HostSpec("sandbox:mallory/attacks", [str(self.plugin)], ["attacks"], 1024, self.mallory,
                          tuple(layers)),
                 HostSpec("sandbox:mallory/reader", [str(readers["mallory"])], ["mallory_reader"], 1024,
                          self.mallory, tuple(layers)),
                 HostSpec("sandbox:bob/reader", [str(readers["bob"])], ["bob_reader"], 1024, self.bob, tuple(layers))]
        fail = Policy("fail", deadline_s=4.0, max_failures=1000)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.group = HostGroup(specs, {"attacks": fail, "mallory_reader": fail, "bob_reader": fail},
                               HostSettings(restart_backoff_s=0.0), sink=lambda e, f: self.events.append((e, f)))
        os.environ["SWIFTK_TEST_SECRET"] = SECRET  # in the kernel's environment; no host may see it
        assert self.group.start() == []
        for kind, name in (("reward", "attack"), ("reward", "mallory_rows"), ("reward", "bob_rows")):
            assert self.group.build(kind, name, {}) == []
        self.listener = Listener(tmp)

    def attack(self, action: str, *args: object) -> str:
        proxy = self.group.proxies[("reward", "attack")]
        result = proxy.swiftk_reward_compute(prompts=[action, *map(str, args)], completions=[], references=[],
                                             state=None)
        return str(result["outcome"])

    def others_work(self) -> None:
        for name in ("mallory_rows", "bob_rows"):
            proxy = self.group.proxies[("reward", name)]
            assert proxy.swiftk_reward_compute(prompts=["p"], completions=["c"], references=[None],
                                               state=None) == {"rows": [3.0]}

    def close(self) -> None:
        self.listener.close()
        self.group.close()
        os.environ.pop("SWIFTK_TEST_SECRET", None)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("sandbox")
    tmp.chmod(0o755)
    built = World(tmp)
    yield built
    built.close()
    assert sandbox_leftovers() == []


def test_each_host_reports_every_layer_it_got(world: World) -> None:
    for host in world.group.hosts:
        assert host.hello is not None and host.hello.sandbox is not None
        got = host.hello.sandbox
        assert {"uid", "namespaces", "seccomp", "rlimits", "no_new_privs"} <= set(got), got
        assert got["uid"].startswith(f"uid {host.spec.tenant.uid} ")  # type: ignore[union-attr]
    world.others_work()


NETWORK = ["tcp", "udp", "unix_socket", "abstract_socket", "dns"]


@pytest.mark.parametrize("action", NETWORK)
def test_no_network_and_no_host_sockets(world: World, action: str) -> None:
    args = {"tcp": ("127.0.0.1", world.listener.tcp.getsockname()[1]),
            "udp": ("127.0.0.1", world.listener.udp.getsockname()[1]),
            "unix_socket": (world.listener.path,), "abstract_socket": (world.listener.abstract_name,),
            "dns": ("example.com",)}[action]
    outcome = world.attack(action, *args)
    assert world.listener.received() == [], outcome  # what counts: nothing reached the other side
    assert outcome.startswith("blocked"), outcome


def test_files_of_the_machine_other_tenants_and_the_kernel_are_invisible(world: World) -> None:
    bob = world.tmp / "data" / "bob" / "rows.txt"
    for path in ("/etc/shadow", bob, world.tmp / "scratch" / "bob" / "notes.txt", f"/proc/{os.getpid()}/environ",
                 "/root/.bash_history", Path.cwd() / "pyproject.toml"):
        outcome = world.attack("read", path)
        assert outcome.startswith("blocked"), (path, outcome)
    assert world.attack("environment", SECRET).startswith("blocked")
    assert world.attack("read", world.tmp / "data" / "mallory" / "rows.txt").startswith("done")  # its own data


def test_writes_outside_scratch_fail(world: World) -> None:
    targets = ["/tmp/escaped", "/dev/shm/escaped", world.plugin, world.tmp / "scratch" / "bob" / "notes.txt",
               world.tmp / "data" / "mallory" / "rows.txt", "/etc/escaped"]
    before = world.plugin.read_bytes()
    for target in targets:
        outcome = world.attack("write", target)
        assert outcome.startswith("blocked"), (target, outcome)
    assert world.plugin.read_bytes() == before
    assert not Path("/tmp/escaped").exists() and not Path("/dev/shm/escaped").exists()
    assert (world.tmp / "scratch" / "bob" / "notes.txt").read_text() == "bob's scratch"
    assert world.attack("write", Path(world.mallory.scratch) / "mine.txt").startswith("done")  # its scratch is its own
    assert (Path(world.mallory.scratch) / "mine.txt").stat().st_uid == world.mallory.uid


def test_links_in_scratch_lead_nowhere(world: World) -> None:
    bob_notes = world.tmp / "scratch" / "bob" / "notes.txt"
    for action, target in (("link_read", "/etc/shadow"), ("link_read", bob_notes), ("link_write", world.plugin),
                           ("link_write", bob_notes), ("hard_link", world.plugin)):
        outcome = world.attack(action, target)
        assert outcome.startswith("blocked"), (action, target, outcome)
    assert bob_notes.read_text() == "bob's scratch"


@pytest.mark.parametrize("action", ["exec_shell", "run_shell", "fork_bomb", "kill_everything", "raw_socket",
                                    "raw_execve", "raw_unshare", "raw_setuid", "raw_mount"])
def test_processes_and_system_calls_are_refused(world: World, action: str) -> None:
    outcome = world.attack(action)
    assert outcome.startswith("blocked"), outcome
    world.others_work()


def test_the_kernel_cannot_be_signalled_or_traced(world: World) -> None:
    for action in ("kill", "ptrace"):
        outcome = world.attack(action, os.getpid())
        assert outcome.startswith("blocked"), (action, outcome)


def test_ten_gib_is_refused_and_the_host_lives_on(world: World) -> None:
    host = world.group.providers[("reward", "attack")].host
    pid = host.pid
    outcome = world.attack("allocate_gib", 10)
    assert outcome.startswith("blocked: MemoryError"), outcome
    assert host.pid == pid


def test_an_endless_loop_is_killed_by_its_cpu_budget_and_the_host_restarts(world: World) -> None:
    host = world.group.providers[("reward", "attack")].host
    with pytest.raises(HostDeadError, match="CPU-seconds"):
        world.attack("loop")
    assert world.attack("read", world.tmp / "data" / "mallory" / "rows.txt").startswith("done")  # restarted
    assert host.deaths == 0
    dead = [f for e, f in world.events if e == "host_dead" and "CPU-seconds" in f["reason"]]
    assert dead and dead[-1]["tenant"] == "mallory"
    world.others_work()


def batch(mode: int) -> Batch:
    ids = torch.arange(12, dtype=torch.long).view(2, 6)
    return Batch(ids, ids.clone(), torch.ones_like(ids), num_items_in_batch=mode)


def test_kernel_tensors_cannot_be_changed(world: World) -> None:
    proxy = world.group.proxies[("reward", "attack")]
    given = batch(2)
    outcome = proxy.swiftk_eval_batch(batch=given, outputs=None, state=None)
    assert str(outcome).startswith("blocked"), outcome
    given = batch(1)
    with pytest.raises(PluginError, match="SIGSEGV|SIGBUS"):
        proxy.swiftk_eval_batch(batch=given, outputs=None, state=None)
    assert torch.equal(given.input_ids, torch.arange(12).view(2, 6))
    world.others_work()


def test_what_the_kernel_saw_is_recorded_with_tenant_and_plugin(world: World) -> None:
    deaths = [f for e, f in world.events if e == "host_dead"]
    assert {f["tenant"] for f in deaths} == {"mallory"}
    assert any("memory fault" in f["reason"] for f in deaths)
    assert all(f["plugin"] == "attacks" for f in deaths)


def test_without_the_sandbox_the_same_attacks_succeed(tmp_path: Path) -> None:
    """The control: in a plain host process (isolation = "process") the attacks above work, so their "blocked"
    answers come from the sandbox, not from a broken attack."""
    listener = Listener(tmp_path)
    secret = tmp_path / "other-tenant.txt"
    secret.write_text("private")
    group = HostGroup([HostSpec("process:attacks", [str(HERE / "attacks.py")], ["attacks"])],
                      {"attacks": Policy("fail", deadline_s=10.0)}, HostSettings())
    os.environ["SWIFTK_TEST_SECRET"] = SECRET
    try:
        assert group.start() == [] and group.build("reward", "attack", {}) == []
        proxy = group.proxies[("reward", "attack")]

        def attack(action: str, *args: object) -> str:
            return str(proxy.swiftk_reward_compute(prompts=[action, *map(str, args)], completions=[], references=[],
                                                   state=None)["outcome"])

        for action, address in (("tcp", ("127.0.0.1", listener.tcp.getsockname()[1])), ("udp", ("127.0.0.1",
                                listener.udp.getsockname()[1])), ("unix_socket", (listener.path,)),
                                ("abstract_socket", (listener.abstract_name,))):
            outcome = attack(action, *address)
            assert [data for _, data in listener.received()] == [b"escaped"], (action, outcome)
        assert attack("read", secret).startswith("done")
        assert attack("environment", SECRET).startswith("done")
        assert attack("write", tmp_path / "escaped").startswith("done")
        assert attack("raw_socket").startswith("done")
    finally:
        group.close()
        listener.close()
        os.environ.pop("SWIFTK_TEST_SECRET", None)
