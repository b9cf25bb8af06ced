"""The ``bgpo`` command: ``bgpo train --config CONFIG.yaml [--resume] [section.key=value ...]``."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

__all__ = ["main", "train_main"]


def _options_help() -> str:
    from .train.config import describe_options

    lines = ["options (section.key=value; defaults shown):"]
    for key, default, help_text in describe_options():
        lines.append(f"  {key} = {default}")
        lines.extend(textwrap.wrap(help_text, 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _train_parser(prog: str) -> argparse.ArgumentParser:
    from .train.config import PRESET_DIR

    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a masked diffusion LM with BGPO (or vrpo, diffu_grpo, spg, wd1).",
        epilog=_options_help(),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="a YAML config file")
    source.add_argument("--preset", help=f"a shipped config: {presets}")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (checkpoint.resume)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override options, e.g. rollout.group_size=4")
    return parser


def train_main(argv: list[str] | None = None, prog: str = "bgpo train") -> int:
    import yaml

    from .train.config import config_to_dict, load_config
    from .train.distributed import init_distributed
    from .train.trainer import Trainer

    args = _train_parser(prog).parse_args(argv)
    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    try:
        config = load_config(args.config, overrides, preset=args.preset)
        context = init_distributed(config.distributed)
        config.validate(context.world_size)
    except ValueError as error:
        print(f"bgpo train: config error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        return 0
    result = Trainer(config, context=context).train()
    if context.is_main:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: bgpo train [--config CONFIG.yaml | --preset NAME] [--resume] [key=value ...]\n"
             "       bgpo train --help   (every option with its default)")
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if argv[:1] != ["train"]:
        print(usage, file=sys.stderr)
        return 2
    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
