"""The ``keye-train`` command: LightningCLI's ``fit|validate|test|predict --config X.yaml`` for every
stage, beside Keye's own ``plugins`` (list every plugin) and ``export`` (composite checkpoint)."""

from __future__ import annotations

import argparse
import sys

from keye_moe.plugins import PluginError

OWN_COMMANDS = ("plugins", "export")


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


def lightning_cli(argv: list[str] | None, *, run: bool = True):
    """LightningCLI over keye-train's modules (any ``KeyeLMTraining`` subclass by ``class_path``) and
    ``KeyeDataModule``; the bad-record report is always on."""
    from lightning.pytorch.cli import LightningCLI

    from keye_train.data import BadRecordReport, KeyeDataModule, PredictionWriter
    from keye_train.training import KeyeLMTraining

    return LightningCLI(
        KeyeLMTraining,
        KeyeDataModule,
        subclass_mode_model=True,
        # the data module's sampler shards packs by rank itself (that is what makes it resumable)
        trainer_defaults={
            "callbacks": [BadRecordReport(), PredictionWriter()],
            "use_distributed_sampler": False,
        },
        save_config_kwargs={"overwrite": True},
        args=argv,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in OWN_COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(f"keye-train {{fit,validate,test,predict}} --config X.yaml | {' | '.join(OWN_COMMANDS)}\n")
        lightning_cli(argv if explicit else None)
        return 0
    parser = argparse.ArgumentParser(prog="keye-train", description="Keye-VL training and tools")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list every keye plugin, its distribution, version and hooks")
    export = commands.add_parser("export", help="write a composite safetensors checkpoint from a .ckpt")
    export.add_argument("checkpoint", help="a Lightning checkpoint written by `keye-train fit`")
    export.add_argument("out", help="output folder (config.json, safetensors shards, tokenizer)")
    args = parser.parse_args(argv)
    try:
        if args.command == "plugins":
            return list_plugins()
        from keye_train.export import export_checkpoint

        print(f"exported to {export_checkpoint(args.checkpoint, args.out)}")
        return 0
    except PluginError as exc:
        print(f"keye-train: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
