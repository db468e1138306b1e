"""Command line: run the numbered notebooks for a parameter profile.

    python -m zsl_utils run [--profile demo] [--notebooks 01 02] [--set key=value ...] [--dry-run]
    python -m zsl_utils profiles
    python -m zsl_utils check-profile NAME [--set key=value ...]

Exit status: 0 on success, 2 when the input is rejected (nothing was run), 1 when a notebook failed.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

# jsonschema (imported by nbformat, imported by papermill) builds a Lark grammar for the optional
# "iri" string format at import time: about 1 s of CPU that no notebook check uses. Blocking that
# optional module keeps `check-profile` and a typo in `make demo` failing within a second.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]

from zsl_utils import profiles  # noqa: E402
from zsl_utils.errors import ZslError  # noqa: E402

SET_HELP = ("override a parameter for every notebook declaring it, or for one notebook (e.g. --set "
            "imagenet21k_root=/data/in21k --set 01_conse_construction.batch_size=8); VALUE is read as YAML")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m zsl_utils``."""
    parser = argparse.ArgumentParser(prog="python -m zsl_utils", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="validate, then execute the numbered notebooks with papermill")
    run.add_argument("--profile", default="demo", help="profile name in notebooks/profiles, or a .yaml path")
    run.add_argument("--notebooks", nargs="+", metavar="NN", help="only these notebooks (numbers like 01 or stems)")
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan, run nothing")
    run.add_argument("--log-output", action="store_true", help="echo notebook output to the terminal")
    commands.add_parser("profiles", help="list the available profiles")
    check = commands.add_parser("check-profile", help="validate a profile against every notebook, run nothing")
    check.add_argument("profile", help="profile name or .yaml path")
    for command in (run, check):
        command.add_argument("--set", dest="overrides", action="append", default=[],
                             metavar="[NOTEBOOK.]KEY=VALUE", help=SET_HELP)
    return parser


def _run(args: argparse.Namespace) -> int:
    plan = profiles.plan_runs(args.profile, getattr(args, "notebooks", None), args.overrides)
    print(profiles.describe_plan(plan))
    if args.command == "check-profile" or args.dry_run:
        print(f"profile {args.profile!r} is valid for {len(plan)} notebook(s); none executed")
        return 0
    outputs = profiles.execute_plan(plan, log_output=args.log_output)
    print(f"executed {len(outputs)} notebook(s); copies in {outputs[0].parent if outputs else 'nowhere'}")
    return 0


def _list_profiles(_: argparse.Namespace) -> int:
    for name in profiles.available_profiles():
        print(f"{name:<16} {profiles.load_profile(name).description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _list_profiles(args) if args.command == "profiles" else _run(args)
    except profiles.NotebookExecutionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ZslError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
