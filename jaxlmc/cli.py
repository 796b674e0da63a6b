"""The `jaxlmc` command: a thin layer over jaxlmc.api."""
from __future__ import annotations

import argparse
import os
import sys

from jaxlmc.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlmc", description="Vectorised fine-tuning ensembles and "
                                     "linear mode connectivity in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [("pretrain", "pretrain one model, saving Orbax checkpoints at pretrain.save_steps"),
                       ("finetune", "fine-tune the member grid in one compiled program (pretrains first if "
                                    "needed) and write members.csv")]:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("config", help="TOML config file (see configs/)")
        sub.add_argument("--out", help="run directory (default: runs/<config name>)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value; repeatable")
        sub.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jaxlmc import config

    try:
        cfg = config.load(args.config, args.overrides)
    except ConfigError as err:
        print(f"jaxlmc: config error: {err}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])

    from jaxlmc import api, ui

    try:
        if args.command == "pretrain":
            rows = api.pretrain(cfg, out, progress=not args.quiet)
            if not args.quiet:
                ui.print_pretrain(rows)
        else:
            rows = api.finetune(cfg, out, progress=not args.quiet)
            if not args.quiet:
                ui.print_members(rows)
    except ConfigError as err:
        print(f"jaxlmc: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        ui.console.print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
