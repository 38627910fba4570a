"""The ``keye-train`` command: Keye's own subcommands beside LightningCLI's."""

from __future__ import annotations

import argparse
import sys

from keye_moe.plugins import PluginError


def list_plugins() -> int:
    from keye_train.registry import plugin_host

    host = plugin_host()
    rows = [("plugin", "distribution", "version", "hooks")]
    for info in host.plugins():
        rows.append((info.name, info.distribution, info.version, ", ".join(info.hooks) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    print()
    for hook in sorted(name for name in dir(host.manager.hook) if name.startswith("keye_")):
        components = host.registry(hook)
        print(f"{hook}: {', '.join(sorted(components)) or '-'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="keye-train", description="Keye-VL training and tools")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list every keye plugin, its distribution, version and hooks")
    args = parser.parse_args(argv)
    try:
        if args.command == "plugins":
            return list_plugins()
    except PluginError as exc:
        print(f"keye-train: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
