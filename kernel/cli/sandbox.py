"""``swiftk sandbox doctor``: which sandbox layers this machine supports, and what a tenant's host really got."""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time
from pathlib import Path

DOCTOR_HELP = textwrap.dedent("""\
    Print which sandbox layers this machine supports (uid, namespaces, rlimits, seccomp, landlock, cgroup,
    no_new_privs), then start an empty sandboxed host per tenant of CONFIG (or one probe tenant) and print what
    each host actually got, read back from inside it (/proc/self/status, its namespaces, its cgroups). No
    tenant code is imported. See SECURITY.md for what each layer stops.

    exit codes: 0 every required layer is in effect ([sandbox] require; default uid, namespaces, seccomp,
    rlimits), 1 a required layer is missing or a host did not get it.""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Check what the sandbox for tenants' plugins can do on this machine."
    verbs = parser.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)
    doctor = verbs.add_parser("doctor", help="the layers this machine supports and what a tenant host got",
                              description=DOCTOR_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor.add_argument("config", nargs="?", help="a run config: check its [tenants] and [sandbox] require")


def main(args: argparse.Namespace) -> int:
    return doctor(args.config)


def doctor(config: str | None) -> int:
    """Print the machine's layers, start one empty host per tenant (the config's, or a probe tenant) and print
    what each got, read back from inside it. Exit 1 when a required layer is missing or was not applied."""
    from swiftk.hosts import tenants
    from swiftk.hosts.group import HostGroup, HostSettings, HostSpec
    from swiftk.hosts.sandbox import CORE, LAYERS

    require: list[str] | None = None
    specs: list[HostSpec] = []
    available = tenants.machine_layers()
    if config is not None:
        from swiftk.kernel.config import load_config
        from swiftk.kernel.plugins import sandboxed_sources, tenant_specs

        cfg = load_config(config)
        require = list(cfg.sandbox.require) if cfg.sandbox.require is not None else None
    wanted = list(CORE) if require is None else require
    print("swiftk sandbox doctor: the layers this machine can give a tenant's plugin host\n")
    print(f"{'layer':<14}{'required':<10}machine")
    for layer in LAYERS:
        problem = available.get(layer, "not probed")
        print(f"{layer:<14}{'yes' if layer in wanted else 'no':<10}{'available' if problem is None else problem}")
    layers, missing, _ = tenants.plan(require)
    if missing:
        print("\n" + tenants.unavailable_message(missing, require))
        return 1
    if config is not None:
        found, problems = tenant_specs(cfg, sandboxed_sources(cfg))
        if problems:
            print("\n" + "\n".join(problems))
            return 1
        first = {spec.tenant.name: spec for spec in found if spec.tenant is not None}
        specs = [HostSpec(f"sandbox:{name}/doctor", [], [], spec.memory_mb, spec.tenant, spec.layers)
                 for name, spec in sorted(first.items())]
    if not specs:  # no config, or no tenants in it: a probe tenant with the default limits
        scratch = Path(tempfile.gettempdir()) / "swiftk-tenants" / "doctor"
        tenant = tenants.Tenant("doctor", tenants.tenant_uid("doctor", 61000, set()), str(scratch))
        specs = [HostSpec("sandbox:doctor", [], [], tenant.memory_mb, tenant, tuple(layers))]
    healthy = True
    group = HostGroup(specs, {}, HostSettings())
    try:
        started = time.perf_counter()
        problems = group.start()
        elapsed = time.perf_counter() - started
        for problem in problems:
            print(f"\n{problem}")
            healthy = False
        for host in group.hosts:
            if host.hello is None or host.spec.tenant is None:
                continue
            got = host.hello.sandbox or {}
            tenant = host.spec.tenant
            print(f"\ntenant '{tenant.name}' (uid {tenant.uid}, scratch {tenant.scratch}): its host (pid "
                  f"{host.pid}) started in {elapsed:.2f} s and got")
            for layer in LAYERS:
                print(f"  {layer:<14}{got.get(layer, 'MISSING' if layer in wanted else 'not applied')}")
            lost = [layer for layer in wanted if layer not in got]
            if lost:
                healthy = False
                print(f"  required but not in effect: {', '.join(lost)}")
    finally:
        group.close()
    print(f"\nverdict: {'ok' if healthy else 'NOT SAFE for untrusted plugins'} (required: {', '.join(wanted)})")
    return 0 if healthy else 1
