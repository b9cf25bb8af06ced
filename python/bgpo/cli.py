"""The ``bgpo`` command: ``bgpo train --config CONFIG.yaml [--resume] [section.key=value ...]`` and
``bgpo plan --memory GIB ...`` (``bgpo.plan``) and ``bgpo export CHECKPOINT OUT_DIR`` (``bgpo.models.export``)."""
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
        epilog=EXIT_CODES + "\n\n" + _options_help(),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="a YAML config file")
    source.add_argument("--preset", help=f"a shipped config: {presets}")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint of output_dir (checkpoint.resume); refused "
                             "when the config differs from the checkpoint's in a key that changes the training")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume even though the config differs (checkpoint.force_resume; the keys are printed)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override options, e.g. rollout.group_size=4")
    return parser


EXIT_CODES = """exit codes:
  0    finished (all steps, final evaluation and checkpoint)
  1    error: a non-finite update (optim.max_nonfinite, or non-finite weights), a checkpoint that cannot
       be written or read (the file and the cause are printed), or any other exception
  2    usage or config error (printed as 'config error: <section.key>: ...'), including a refused --resume
  130  stopped by SIGINT, 143 by SIGTERM (128 + the signal's number): after the current step, with a
       checkpoint (continue with --resume); during start-up or the supervised warm-up, with nothing saved"""


def train_main(argv: list[str] | None = None, prog: str = "bgpo train") -> int:
    from .train.signals import StopSignals, StoppedBySignal, signal_exit_code

    stop = StopSignals().install()  # first: a signal during start-up exits cleanly with its code
    try:
        return _train(argv, prog, stop)
    except StoppedBySignal as stopped:
        print(f"bgpo train: {stopped}; nothing saved", file=sys.stderr)
        return signal_exit_code(stopped.signum)
    finally:
        stop.restore()


def _train(argv: list[str] | None, prog: str, stop) -> int:
    from .train.config import load_config
    from .train.distributed import close_distributed, init_distributed
    from .train.signals import StoppedBySignal

    args = _train_parser(prog).parse_intermixed_args(argv)  # key=value before and after --resume
    resume = ["checkpoint.resume=true"] if args.resume or args.force_resume else []
    overrides = list(args.overrides) + resume + (["checkpoint.force_resume=true"] if args.force_resume else [])
    try:
        config = load_config(args.config, overrides, preset=args.preset)
        context = init_distributed(config.distributed)
    except ValueError as error:
        print(f"bgpo train: config error: {error}", file=sys.stderr)
        return 2
    try:
        code = _run(config, context, args.print_config, stop)
    except StoppedBySignal:  # an orderly exit too: this rank is between collectives
        close_distributed(context)
        raise
    close_distributed(context)  # not on an unexpected exception: another rank may still be in a collective
    return code


def _run(config, context, print_config: bool, stop) -> int:
    """Validate the config for the world size, build the trainer and train; the exit code."""
    import yaml

    from .rewards.sandbox import SandboxUnavailable
    from .train.checkpoint import CheckpointError
    from .train.config import config_to_dict
    from .train.signals import signal_exit_code
    from .train.trainer import NonFiniteError, Trainer

    try:
        config.validate(context.world_size)
        if print_config:
            print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
            return 0
        trainer = Trainer(config, context=context, stop=stop)
    except ValueError as error:
        print(f"bgpo train: config error: {error}", file=sys.stderr)
        return 2
    except (SandboxUnavailable, CheckpointError) as error:  # no sandbox (what to install); an unreadable checkpoint
        print(f"bgpo train: error: {error}", file=sys.stderr)
        return 1
    try:
        result = trainer.train()
    except (NonFiniteError, CheckpointError) as error:
        print(f"bgpo train: error: {error}", file=sys.stderr)
        return 1
    if context.is_main:
        print(json.dumps(result))
    return signal_exit_code(result["signal"]) if result.get("stopped") else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: bgpo train [--config CONFIG.yaml | --preset NAME] [--resume] [key=value ...]\n"
             "       bgpo train --help   (every option with its default)\n"
             "       bgpo plan --memory GIB [--preset llada-8b --nt 16 ...]   (micro-batch, samples per forward, "
             "checkpointing for a memory budget; bgpo plan --help)\n"
             "       bgpo export CHECKPOINT OUT_DIR [--dtype bfloat16]   (a Hugging Face folder: config.json + "
             "safetensors under LLaDA's names)")
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if argv[:1] == ["plan"]:
        from .plan import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] != ["train"]:
        print(usage, file=sys.stderr)
        return 2
    return train_main(argv[1:])


def export_main(argv: list[str] | None = None, prog: str = "bgpo export") -> int:
    """``bgpo export CHECKPOINT OUT_DIR``: ``bgpo.models.export.export_hf`` (exit 2 with the reason on bad input)."""
    from .models.export import export_hf
    from .train.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog=prog, description=(
        "Write a trainer checkpoint as a Hugging Face folder (config.json + model.safetensors with LLaDA's "
        "parameter names) that LLaDAModelLM.from_pretrained and LLaDA's own modeling code load."))
    parser.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step-N), or a run's output "
                                           "directory or checkpoints/ (its newest complete checkpoint)")
    parser.add_argument("out_dir", help="the folder to write (must not hold config.json or model.safetensors)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert the weights")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.checkpoint, args.out_dir, dtype=args.dtype)
    except (ValueError, CheckpointError, FileNotFoundError) as error:
        print(f"bgpo export: error: {error}", file=sys.stderr)
        return 2
    print(f"bgpo export: wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
