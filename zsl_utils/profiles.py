"""Parameter profiles for the notebooks, their validation, and the papermill runner.
A profile ``notebooks/profiles/<name>.yaml`` may hold ``description``, ``notebooks`` (the default selection of
``run``), ``common`` (for every notebook declaring the name) and a section per notebook stem (beats ``common``);
the runner sets ``profile_name`` and writes executed copies to ``runs/<profile>/<notebook>.ipynb``. Each notebook's
first code cell, tagged ``parameters``, declares typed, commented parameters, read with
``papermill.inspect_notebook``. Before any notebook runs, every value is checked against its annotation (int,
float, str, bool, list[T], Optional[T], Any) and against markers in its comment:

* ``(one of: "auto", "cuda:*")``: Python literals, a string with ``*`` or ``?`` being a pattern (not
  ``Literal[...]``: papermill drops annotations containing quotes);
* ``(at least 1)``, ``(above 0)``, ``(at most N)``, ``(below N)`` bound a number or each item of a list (no
  ``>=``: papermill skips a line holding a second ``=``); ``(non-empty)``, ``(increasing)`` (no repeats) for lists;
* a non-empty value (the profile's, else the default) of a name ending in ``_root``, ``_dir``, ``_path`` or ``_file``
  must exist, relative to ``notebooks/`` (papermill's cwd), unless its comment says ``(created if missing)``."""
from __future__ import annotations

import ast
import difflib
import fnmatch
import operator
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import nbformat
import papermill
import yaml
from papermill.exceptions import PapermillExecutionError

from zsl_utils import config
from zsl_utils.errors import ParameterError, ZslError

RUNNER_PARAMETER = "profile_name"  # set by the runner to the profile's name, never by a profile
KERNEL_NAME = "python3"
RESERVED_KEYS = ("common", "description", "notebooks")
CHOICES_RE = re.compile(r"\(one of:\s*(?P<items>[^)]*)\)")
BOUND_RE = re.compile(r"\((at least|at most|above|below) (-?\d+(?:\.\d+)?)\)")
COMPARE = {"at least": operator.ge, "at most": operator.le, "above": operator.gt, "below": operator.lt}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # in a profile, True is not 1


TYPE_CHECKS = {"None": lambda v: True, "Any": lambda v: True,  # "None": no annotation, anything goes
               "int": lambda v: _is_number(v) and isinstance(v, int), "float": _is_number,
               "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
               "list": lambda v: isinstance(v, list)}  # papermill passes YAML sequences as lists


class NotebookExecutionError(ZslError):
    """A notebook raised while the runner executed it."""


class NotebookParameter(NamedTuple):
    """One line of a ``parameters`` cell, as ``papermill.inspect_notebook`` reports it."""
    name: str
    type_name: str  # "None" when the line has no annotation
    default: str  # source text
    help: str  # the trailing comment

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The values of a ``(one of: a, b)`` comment; None when absent."""
        match = CHOICES_RE.search(self.help)
        try:
            return tuple(ast.literal_eval("(" + match.group("items") + ",)")) if match else None
        except (ValueError, SyntaxError) as exc:
            raise ParameterError(f"Cannot read the allowed values in the comment {self.help!r}: write them as "
                                 f'Python literals separated by commas, e.g. (one of: "auto", "cpu").') from exc

    @property
    def is_input_path(self) -> bool:
        return self.name.endswith(("_root", "_dir", "_path", "_file")) and "(created if missing)" not in self.help

    def default_value(self) -> Any:
        """The default as a Python value; ValueError or SyntaxError if it is not a literal."""
        return ast.literal_eval(self.default)

    def broken_rule(self, value: Any) -> str | None:
        """The comment's rule that a well-typed ``value`` breaks, or None."""
        if self.choices is not None and not value_in_choices(value, self.choices):
            return "it must be one of " + ", ".join(map(repr, self.choices))
        if self.name == "device" and str(value).startswith("cuda:") and not str(value)[5:].isdigit():
            return "a CUDA device is cuda:N, N the number of a GPU (e.g. cuda:0)"
        items = value if isinstance(value, list) else [value]
        for op, bound in BOUND_RE.findall(self.help):
            if any(_is_number(item) and not COMPARE[op](item, float(bound)) for item in items):
                return f"{'each item' if isinstance(value, list) else 'it'} must be {op} {bound}"
        if "(non-empty)" in self.help and not items:
            return "it needs at least one value"
        if "(increasing)" in self.help and items != sorted(set(items)):
            return "its values must increase, without repeats"
        return None


def value_in_choices(value: Any, choices: Sequence[Any]) -> bool:
    """Whether ``value`` is a choice (or matches a string pattern); 1 and 1.0 are the same choice, True is never 1."""
    if isinstance(value, str):
        return any(isinstance(choice, str) and fnmatch.fnmatchcase(value, choice) for choice in choices)
    if _is_number(value):
        return any(_is_number(choice) and choice == value for choice in choices)
    return any(type(choice) is type(value) and choice == value for choice in choices)


def value_matches_type(value: Any, type_name: str) -> bool:
    """Whether a YAML value fits an annotation (``inferred_type_name`` as papermill reports it)."""
    outer, bracket, inner = type_name.replace(" ", "").partition("[")
    if bracket and outer in ("list", "List"):
        return isinstance(value, list) and all(value_matches_type(item, inner[:-1]) for item in value)
    if bracket and outer == "Optional":
        return value is None or value_matches_type(value, inner[:-1])
    if not bracket and outer in TYPE_CHECKS:
        return TYPE_CHECKS[outer](value)
    raise ParameterError(f"Unsupported annotation {type_name!r}: use int, float, str, bool, list[...], "
                         f"Optional[...] or Any in a parameters cell.")


def list_notebooks(notebooks_dir: Path | None = None) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb``, in run order."""
    return sorted(Path(notebooks_dir or config.NOTEBOOKS_DIR).glob("[0-9][0-9]_*.ipynb"))


def read_notebook_parameters(notebook: Path) -> dict[str, NotebookParameter]:
    """The parameters of ``notebook``, in declaration order."""
    notebook = Path(notebook).resolve()
    return dict(_read_parameters(notebook, notebook.stat().st_mtime_ns))


@lru_cache(maxsize=64)
def _read_parameters(notebook: Path, _mtime_ns: int) -> dict[str, NotebookParameter]:
    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for a broken file
        raise ParameterError(f"Cannot read notebook {notebook}: {type(exc).__name__}: {exc}. Check that it is "
                             f"valid notebook JSON (an unresolved merge conflict?) or regenerate it.") from exc
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells):
        raise ParameterError(f"{notebook} has no cell tagged 'parameters': tag its first code cell "
                             f'with metadata {{"tags": ["parameters"]}}.')
    if not nb.metadata.get("kernelspec", {}).get("name"):  # papermill picks its parser by kernel
        raise ParameterError(f"{notebook} has no metadata.kernelspec.name: set it to {KERNEL_NAME!r}.")
    found = papermill.inspect_notebook(notebook).values()
    return {p["name"]: NotebookParameter(p["name"], p["inferred_type_name"], p["default"], p["help"]) for p in found}


class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key_node, deep=deep) for key_node, _ in node.value]
        for (key_node, _), key in zip(node.value, keys):
            if keys.count(key) > 1:
                raise ParameterError(f"Key {key!r} appears twice in one mapping ({key_node.start_mark}); keep one.")
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads `1e-3` (no dot) as a string, and a learning rate written so would be rejected.
_ProfileLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml_text(text: str, source: str) -> Any:
    """Parse YAML with the profile rules; errors name ``source``."""
    try:
        return yaml.load(text, Loader=_ProfileLoader)
    except ParameterError as exc:
        raise ParameterError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParameterError(f"{source} is not valid YAML: {exc}. Fix the syntax at that line.") from None


class Profile(NamedTuple):
    name: str
    path: Path
    description: str
    notebooks: tuple[str, ...]  # default selection (numbers or stems); empty: all
    common: dict[str, Any]
    sections: dict[str, dict[str, Any]]


def available_profiles(profiles_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in Path(profiles_dir or config.PROFILES_DIR).glob("*.yaml"))


def load_profile(name_or_path: str | Path, profiles_dir: Path | None = None) -> Profile:
    """Read and structurally check a profile named (``demo``) or given as a .yaml path; values are checked later."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and not path.is_file():
        raise ParameterError(f"Profile file {path} does not exist: check the path.")
    if path.suffix not in (".yaml", ".yml"):
        path = Path(profiles_dir or config.PROFILES_DIR) / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ParameterError(f"Unknown profile {str(name_or_path)!r}: no file {path}. Available profiles: "
                             f"{', '.join(available_profiles(path.parent)) or 'none'}. Pick one, or give a .yaml path.")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as exc:
        raise ParameterError(f"{path} is not UTF-8: line {exc.object.count(10, 0, exc.start) + 1} holds byte "
                             f"{exc.object[exc.start]:#04x}; save the profile as UTF-8.") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{path} must be a YAML mapping of sections, got {type(data).__name__}.")
    if not isinstance(data.get("description", ""), str):
        raise ParameterError(f"{path}: 'description' must be a string.")
    notebooks = data.get("notebooks") or []
    if not isinstance(notebooks, list) or not all(isinstance(n, (str, int)) for n in notebooks):
        raise ParameterError(f"{path}: 'notebooks' must be a list of notebook numbers or stems, e.g. [\"02\"].")
    sections = {str(key): _section(value, path, str(key)) for key, value in data.items() if key not in RESERVED_KEYS}
    selection = tuple(f"{n:02d}" if isinstance(n, int) else n for n in notebooks)
    common = _section(data.get("common"), path, "common")
    return Profile(path.stem, path, data.get("description", ""), selection, common, sections)


def _section(value: Any, path: Path, section: str) -> dict[str, Any]:
    value = {} if value is None else value
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ParameterError(f"{path}: section {section!r} must map parameter names to values (e.g. 'seed: 0'), "
                             f"got {value!r}.")
    if RUNNER_PARAMETER in value:
        raise ParameterError(f"{path}: section {section!r} sets {RUNNER_PARAMETER!r}, which the runner sets to the "
                             f"profile's name. Remove it from the profile.")
    return dict(value)


def parse_override(text: str) -> tuple[str | None, str, Any]:
    """``--set key=value`` or ``--set <notebook stem>.key=value``; the value is YAML, ``key=`` gives ""."""
    target, sep, raw_value = text.partition("=")
    if not sep or not target.strip():
        raise ParameterError(f"--set {text!r}: expected key=value or <notebook stem>.key=value, e.g. --set seed=1.")
    section, _, key = target.strip().rpartition(".")
    if key == RUNNER_PARAMETER:
        raise ParameterError(f"--set {text!r}: {key!r} is set by the runner; choose --profile instead.")
    return (section or None), key, load_yaml_text(raw_value, f"--set {text}") if raw_value.strip() else ""


class NotebookRun(NamedTuple):
    notebook: Path
    output: Path
    parameters: dict[str, Any]


def check_declared(source: str, name: str, notebooks: Sequence[Path]) -> None:
    """Raise ParameterError, with close matches and the known parameters, if no notebook declares ``name``."""
    declared = {n: p for nb in notebooks for n, p in read_notebook_parameters(nb).items()}
    if name not in declared:
        close = difflib.get_close_matches(name, list(declared), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        listing = ", ".join(f"{p.name} ({p.type_name})" for p in declared.values()) or "none"
        raise ParameterError(f"{source}: unknown parameter {name!r}.{hint} Parameters of "
                             f"{', '.join(nb.name for nb in notebooks)}: {listing}. Fix the name, or declare the "
                             f"parameter in the notebook's parameters cell.")


def check_value(source: str, notebook: Path, parameter: NotebookParameter, value: Any) -> None:
    """Raise ParameterError if ``value`` has the wrong type or breaks the parameter comment's rule."""
    where = f"{source}: parameter {parameter.name!r} of {notebook.name}"
    try:
        type_ok = value_matches_type(value, parameter.type_name)
    except ParameterError as exc:
        raise ParameterError(f"{notebook.name}, parameter {parameter.name!r}: {exc}") from None
    if not type_ok:
        allowed = f" Allowed values: {', '.join(map(repr, parameter.choices))}." if parameter.choices else ""
        raise ParameterError(f"{where} expects {parameter.type_name}, got {value!r} ({type(value).__name__})."
                             f"{allowed} Fix the value in the profile or the --set option.")
    if rule := parameter.broken_rule(value):
        raise ParameterError(f"{where} got {value!r}, which is not allowed: {rule}. Fix the value in the profile "
                             f"or the --set option.")


def check_path(source: str, notebook: Path, parameter: NotebookParameter, value: Any) -> None:
    """Raise ParameterError if an input-path parameter names nothing on disk."""
    if not parameter.is_input_path or not isinstance(value, str) or not value.strip():
        return
    resolved = (notebook.parent / Path(value).expanduser()).resolve()
    if not resolved.exists():
        raise ParameterError(f"{source}: parameter {parameter.name!r} of {notebook.name} points to {value!r} "
                             f"({resolved}), which does not exist. Edit the profile, or pass --set "
                             f"{parameter.name}=/real/path (a relative path starts at {notebook.parent.resolve()}).")


def resolve_parameters(profile: Profile, notebook: Path, overrides: Iterable[tuple[str | None, str, Any]] = (),
                       check_paths: bool = True) -> dict[str, Any]:
    """Validated parameters for one notebook: ``common``, then its section, then parsed ``--set`` overrides."""
    notebook = Path(notebook)
    declared = read_notebook_parameters(notebook)
    chosen = {name: (f"{profile.path} [common]", v) for name, v in profile.common.items() if name in declared}
    for name, value in profile.sections.get(notebook.stem, {}).items():
        check_declared(f"{profile.path} [{notebook.stem}]", name, [notebook])
        chosen[name] = (f"{profile.path} [{notebook.stem}]", value)
    for section, name, value in overrides:
        if section in (None, notebook.stem) and name in declared:
            chosen[name] = (f"--set {section + '.' if section else ''}{name}", value)
    for name, (source, value) in chosen.items():
        check_value(source, notebook, declared[name], value)
    for parameter in declared.values() if check_paths else ():
        try:
            source, value = chosen.get(parameter.name) or (f"{notebook.name} (default)", parameter.default_value())
        except (ValueError, SyntaxError):
            continue  # a computed default cannot be checked before running
        check_path(source, notebook, parameter, value)
    runner = {RUNNER_PARAMETER: profile.name} if RUNNER_PARAMETER in declared else {}
    return {name: value for name, (_, value) in chosen.items()} | runner


def select_notebooks(all_notebooks: list[Path], wanted: Sequence[str] | None) -> list[Path]:
    """Notebooks matching ``wanted`` (numbers like ``01`` or full stems), in run order; all when empty."""
    names = {nb: {nb.stem, nb.stem.split("_", 1)[0]} for nb in all_notebooks}
    for item in wanted or ():
        if not any(item in stems for stems in names.values()):
            raise ParameterError(f"Notebook selection {item!r} (from --notebooks or the profile's 'notebooks' list) "
                                 f"matches no notebook. Available: {', '.join(nb.stem for nb in all_notebooks)}.")
    return [nb for nb in all_notebooks if not wanted or names[nb] & set(wanted)]


def _check_names(profile: Profile, all_notebooks: list[Path], overrides: Sequence) -> None:
    """Reject sections, common keys and overrides that no notebook could use (typos)."""
    by_stem = {nb.stem: nb for nb in all_notebooks}
    for section in profile.sections:
        if section not in by_stem:
            raise ParameterError(f"{profile.path}: section {section!r} names no notebook in {all_notebooks[0].parent}. "
                                 f"Sections are notebook stems: {', '.join(by_stem)}. Fix or remove the section.")
    for name in profile.common:
        check_declared(f"{profile.path} [common]", name, all_notebooks)
    for section, name, _ in overrides:
        if section and section not in by_stem:
            raise ParameterError(f"--set {section}.{name}: no notebook {section!r}. Notebooks: {', '.join(by_stem)}.")
        check_declared(f"--set {section + '.' if section else ''}{name}", name,
                       [by_stem[section]] if section else all_notebooks)


def plan_runs(profile: str | Path | Profile = "demo", notebooks: Sequence[str] | None = None,
              overrides: Sequence[str] = (), notebooks_dir: Path | None = None, runs_dir: Path | None = None,
              profiles_dir: Path | None = None) -> list[NotebookRun]:
    """Validate everything, run nothing: names against every notebook, paths for the selected ones."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile, profiles_dir)
    all_notebooks = list_notebooks(notebooks_dir)
    if not all_notebooks:
        raise ParameterError(f"No numbered notebooks (NN_*.ipynb) in {notebooks_dir or config.NOTEBOOKS_DIR}.")
    parsed = [parse_override(text) for text in overrides]
    _check_names(profile, all_notebooks, parsed)
    selected = select_notebooks(all_notebooks, notebooks or profile.notebooks)
    output_dir = Path(runs_dir or config.RUNS_DIR) / profile.name
    parameters = {nb: resolve_parameters(profile, nb, parsed, check_paths=nb in selected) for nb in all_notebooks}
    return [NotebookRun(nb, output_dir / nb.name, parameters[nb]) for nb in selected]


def execute_plan(plan: Sequence[NotebookRun], log_output: bool = False, progress_bar: bool = True) -> list[Path]:
    """Run each planned notebook with papermill, in order; stop at the first failure."""
    for run in plan:
        config.ensure_dir(run.output.parent)
        try:
            papermill.execute_notebook(str(run.notebook), str(run.output), parameters=run.parameters, cwd=str(
                run.notebook.parent), kernel_name=KERNEL_NAME, progress_bar=progress_bar, log_output=log_output)
        except PapermillExecutionError as exc:
            raise NotebookExecutionError(f"{run.notebook.name} failed in cell {exc.exec_count}: {exc.ename}: "
                                         f"{exc.evalue}. Full traceback in the executed copy {run.output}.") from exc
    return [run.output for run in plan]
