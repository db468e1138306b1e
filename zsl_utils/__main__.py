"""Command line: run the numbered notebooks for a parameter profile (``run``, ``profiles``, ``check-profile``).
Exit status: 0 on success, 2 when the input is rejected (nothing was run), 1 when a notebook failed."""
from __future__ import annotations

import argparse
import sys

# jsonschema (imported by papermill via nbformat) builds a Lark grammar for the optional "iri" format at import:
# ~1 s of CPU no notebook check uses. Blocking it keeps `check-profile` and a `make demo` typo under a second.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]

from zsl_utils import profiles  # noqa: E402
from zsl_utils.errors import ZslError  # noqa: E402

SET_HELP = "set a parameter in every notebook declaring it, or in one (NOTEBOOK.KEY=...); VALUE is read as YAML"


def build_parser() -> argparse.ArgumentParser:
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
    for notebook, output, parameters in plan:
        print(f"{notebook.name} -> {output}", *(f"    {k} = {v!r}" for k, v in parameters.items()), sep="\n")
    if args.command == "check-profile" or args.dry_run:
        print(f"profile {args.profile!r} is valid for {len(plan)} notebook(s); none executed")
        return 0
    outputs = profiles.execute_plan(plan, log_output=args.log_output)
    print(f"executed {len(outputs)} notebook(s); copies in {outputs[0].parent if outputs else 'nowhere'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "profiles":
            for name in profiles.available_profiles():
                print(f"{name:<16} {profiles.load_profile(name).description}")
            return 0
        return _run(args)
    except ZslError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, profiles.NotebookExecutionError) else 2


if __name__ == "__main__":
    sys.exit(main())
