"""The `diffusion` console script: `diffusion sample --model models/diffusion --out samples/`.

Errors are one line (`error: ...`, exit 2); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence

from ._stage import _expected_errors, one_line


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like the stages' own errors."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows `(default: X)` for options that have a value to show (not for flags or required options); keeps the
    description and epilog as written (the sampler list is one line per sampler)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def _class_list(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices like 0,1,2, got {text!r}") from None
    if not classes:
        raise argparse.ArgumentTypeError("expected at least one class index")
    return classes


def _option(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER like s_churn=10, got {text!r}") from None


def _add_sample(sub) -> None:
    """`diffusion sample`'s options: one add_argument per option, choices from the registry."""
    from diffusion_core.generation import GUIDANCE_KINDS
    from diffusion_core.samplers import SAMPLERS, SPACINGS, describe

    p = sub.add_parser(
        "sample", help="draw samples from a trained model folder",
        description="Draw samples from a model folder written by train_diffusion. Sample i uses seed SEED+i only, so "
                    "a set is the same whatever --batch-size. Latent models are decoded through their autoencoder.",
        epilog="samplers:\n" + describe().replace("%", "%%") + "\n\n--out X.png writes one grid; --out DIR writes "
               "DIR/seed-%06d.png per sample, DIR/samples.npz (images uint8 N x H x W x C, labels, seeds, nfe) and "
               "DIR/grid.png.",
        formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="diffusion model folder (e.g. models/diffusion) "
                   "or its URL on shared storage (s3://bucket/run/models/diffusion; fetched into the local cache)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="sampler (see the list below; default: ddim, or a distilled student's own)")
    p.add_argument("--steps", type=int, default=50, metavar="N",
                   help="grid points (1..T of the model); NFE per sample is printed (heun: 2N-1, cfg doubles)")
    p.add_argument("--eta", type=float, default=None, metavar="E",
                   help="DDIM noise in [0, 1]: 0 deterministic, 1 DDPM-like (ddim only)")
    p.add_argument("--option", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="a sampler option, repeatable (e.g. --option s_churn=10 for heun/euler; list below)")
    p.add_argument("--guidance", choices=GUIDANCE_KINDS, default="none",
                   help="guidance: none, classifier (needs --classifier) or cfg (class-conditional models)")
    p.add_argument("--scale", type=float, default=1.0, metavar="S",
                   help="guidance scale >= 0 (cfg: 1 = plain conditional model, 0 = unconditional)")
    p.add_argument("--classifier", metavar="DIR", default=None,
                   help="noisy classifier folder for --guidance classifier (e.g. models/classifier)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--class", dest="class_", type=int, metavar="K", default=None,
                       help="sample class K only")
    group.add_argument("--classes", type=_class_list, metavar="LIST", default=None,
                       help="comma-separated classes; sample i gets classes[i %% len]. Without --class/--classes, "
                            "guided sampling cycles through all classes and unguided sampling is unconditional")
    p.add_argument("--num", type=int, default=16, metavar="N", help="number of samples")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of sample 0 (sample i uses S+i)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="samples per batch (no effect on results)")
    p.add_argument("--spacing", choices=SPACINGS, default="trailing",
                   help="grid: leading/trailing/linspace timesteps (diffusers' names), logsnr (uniform in log-SNR), "
                        "karras (rho=7 sigmas); snapped to the model's timesteps")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--bf16", action="store_true",
                   help="run the network under bf16 autocast (sampler math stays float32; faster on CPUs with "
                        "bf16 units, samples no longer bitwise those of fp32)")
    p.add_argument("--channels-last", action="store_true", help="run the network in channels_last memory format")
    p.add_argument("--autoencoder", metavar="DIR", default=None,
                   help="autoencoder folder of a latent model (default: the one recorded in the model's config.json)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", required=True, metavar="PATH", help="X.png for a grid, or a folder (see below)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> None:
    from diffusion_core.generation import SamplingSpec, check_device, default_sampler, generate, save_samples
    from diffusion_core.model_folders import load_classifier_dir, load_diffusion_dir

    check_device(args.device)  # before loading: a bad --device is the user's typo, not a corrupt checkpoint
    bundle = load_diffusion_dir(args.model, use_ema=not args.no_ema, map_location=args.device,
                                autoencoder=args.autoencoder)
    clf = load_classifier_dir(args.classifier, map_location=args.device) if args.classifier else None
    classes = [args.class_] if args.class_ is not None else args.classes
    spec = SamplingSpec.from_setting({"sampler": args.sampler or default_sampler(bundle), "steps": args.steps,
                                      "spacing": args.spacing, "options": dict(args.options), "eta": args.eta,
                                      "guidance": args.guidance, "scale": args.scale})
    result = generate(bundle, args.num, spec, classifier_bundle=clf, classes=classes, seed=args.seed,
                      batch_size=args.batch_size, progress=not args.no_progress, device=args.device, bf16=args.bf16,
                      channels_last=args.channels_last)
    save_samples(args.out, result)
    print(f"wrote {args.num} samples to {args.out} ({result['nfe']:g} network evaluations per sample, "
          f"{result['seconds']:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion", description="Diffusion models: sampling from trained model folders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_sample(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `diffusion` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        return 0
    except KeyboardInterrupt:
        print(f"error: {args.command} interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line per failure
        if args.debug:
            traceback.print_exc()
        if isinstance(e, _expected_errors()):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(e).__name__} in {args.command}: {one_line(e)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
