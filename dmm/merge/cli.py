"""`python -m dmm.merge`: merge checkpoints with a registered method (the weight-merging baselines).

    python -m dmm.merge --method weighted_sum --models A B C D --weights 0.25 0.25 0.25 0.25 --out PATH
    python -m dmm.merge --method ties --base BASE --models A B --option density=0.2 --option scale=1.0 --out PATH

Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from dmm.schema import ConfigError


class MergeVerb:
    """The `merge` verb: `arguments(parser)` declares the flags, `run(args)` merges and returns the exit
    status, raising ValueError (ConfigError, MergeError, RegistryError) on bad input. `python -m
    dmm.merge` uses it; the `dmm` command registers it as a verb (`VERBS.add("merge", MergeVerb,
    description=MergeVerb.description)`)."""

    description = "merge checkpoints' weights with a registered method (weighted sum, TIES, DARE, ...)"

    @staticmethod
    def arguments(parser: argparse.ArgumentParser) -> None:
        from dmm.merge import MERGE_METHODS

        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = "methods and their options:\n" + MERGE_METHODS.describe()
        parser.add_argument("--method", required=True, help="a registered merge method (listed below)")
        parser.add_argument("--models", nargs="+", required=True,
                            help="pipeline folders, UNet folders or .safetensors files")
        parser.add_argument("--weights", nargs="+", type=float, help="one weight per model (weighted_sum)")
        parser.add_argument("--base", help="the common base model (ties, dare: task vectors are model - base)")
        parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                            help="a method option; VALUE is read as YAML (numbers, true/false, {a: 1})")
        parser.add_argument("--out", required=True, help="a folder (diffusers layout) or a .safetensors file")

    @staticmethod
    def run(args) -> int:
        from dmm.merge import MERGE_METHODS, merge_models

        if args.weights is not None and args.method in MERGE_METHODS and \
                "weights" not in MERGE_METHODS.get(args.method).options.__dataclass_fields__:
            raise ConfigError(f"--weights is for weighted_sum; {args.method} takes --option KEY=VALUE (see --help)")
        out = merge_models(args.method, args.models, args.out, base=args.base,
                           options=parse_options(args.option, args.weights))
        print(out)
        return 0


def parse_options(pairs: list[str], weights: list[float] | None) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r}: write KEY=VALUE, e.g. --option alpha=0.5")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--option {pair!r}: the value is not valid YAML ({err})") from None
    if weights is not None:
        if "weights" in options:
            raise ConfigError("give the weights once: --weights or --option weights=[...], not both")
        options["weights"] = weights
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmm.merge", description=__doc__.splitlines()[0])
    MergeVerb.arguments(parser)
    args = parser.parse_args(argv)
    try:
        return MergeVerb.run(args)
    except ValueError as err:  # ConfigError, MergeError, RegistryError: bad input
        print(f"dmm merge: {err}", file=sys.stderr)
        return 2
