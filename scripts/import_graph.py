"""The import graph between swiftk's top-level folders, and the lines of code in each (docs/architecture.md).

    .venv/bin/python scripts/import_graph.py [--modules]

Reads every .py file under kernel/, contracts/, plugins/, hosts/, shm/ and native/ with ``ast`` (nothing is
imported) and prints, per folder, its non-blank lines and the folders it imports (with the number of import
statements); ``--modules`` prints module-level edges instead. Function-level (lazy) imports count too.
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("kernel", "contracts", "plugins", "hosts", "shm", "native")


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n.startswith("swiftk.")]


def module_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(("swiftk", *parts))


def graph(root: Path, modules: bool = False) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    """Non-blank lines per folder, and import edges (folder -> folder, or module -> module)."""
    lines: Counter[str] = Counter()
    edges: Counter[tuple[str, str]] = Counter()
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            lines[folder] += sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            source = module_of(path, root) if modules else folder
            for name in imports(path):
                target = name if modules else name.split(".")[1]
                if target != source and (modules or target in FOLDERS):
                    edges[(source, target)] += 1
    return lines, edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="module-level edges")
    parser.add_argument("--root", type=Path, default=REPO, help="a checkout (default: this one)")
    args = parser.parse_args()
    lines, edges = graph(args.root, args.modules)
    for folder in FOLDERS:
        outgoing = sorted((t, n) for (s, t), n in edges.items() if s == folder or s.startswith(f"swiftk.{folder}."))
        if not args.modules:
            print(f"{folder:10s} {lines[folder]:6d} lines -> " + (", ".join(f"{t} ({n})" for t, n in outgoing) or "-"))
    if args.modules:
        for (source, target), count in sorted(edges.items()):
            print(f"{source} -> {target} ({count})")


if __name__ == "__main__":
    main()
