"""Tenant alice's plugin (configs/tenants.toml): after each step it reads alice's private answer key and reports
how many rows it holds, and whether it can see bob's key (in its sandbox it cannot: 0)."""

from pathlib import Path

from swiftk.contracts import hookimpl

DATA = Path(__file__).resolve().parents[3] / "data" / "tenants"
ME, OTHER = "alice", "bob"


def visible(path: Path) -> float:
    try:
        path.read_bytes()
    except OSError:
        return 0.0
    return 1.0


@hookimpl
def swiftk_step_end(state, metrics):
    rows = len((DATA / ME / "answer_key.jsonl").read_text().splitlines())
    return {f"{ME}/key_rows": float(rows), f"{ME}/sees_{OTHER}": visible(DATA / OTHER / "answer_key.jsonl")}
