"""``swiftk env``: the managed environments of tools that pin their own stack (vLLM, EvalScope, llm-compressor)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("List, install or remove the virtual environments swiftk manages for tools it runs in "
                          "their own process (vllm, evalscope, llmcompressor). They live under --env-dir, else "
                          "$SWIFTK_ENV_DIR, else ~/.cache/swiftk/envs; a command that needs one installs it on first "
                          "use.")
    parser.add_argument("action", choices=["list", "install", "remove"])
    parser.add_argument("tool", nargs="?", help="the tool (install, remove): vllm, evalscope or llmcompressor")
    parser.add_argument("--env-dir", help="the folder holding the environments")


def main(args: argparse.Namespace) -> int:
    from swiftk.kernel import envs

    if args.action == "list":
        found = envs.list_envs(args.env_dir)
        if not found:
            print(f"no environments in {envs.root(args.env_dir)} (tools: {', '.join(sorted(envs.TOOLS))})")
        for env in found:
            state = " ".join(env.packages) if env.packages else "incomplete (no marker: reinstalled on next use)"
            print(f"{env.tool:<10} {env.size_mb:>8.0f} MB  {env.path}  {state}")
        return 0
    if not args.tool:
        raise envs.EnvError(f"swiftk env {args.action}: name a tool ({', '.join(sorted(envs.TOOLS))}).")
    if args.action == "install":
        print(envs.ensure(args.tool, args.env_dir))
    elif envs.remove(args.tool, args.env_dir):
        print(f"removed {envs.root(args.env_dir) / args.tool}")
    else:
        print(f"no '{args.tool}' environment in {envs.root(args.env_dir)}")
    return 0
