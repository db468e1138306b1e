"""Parameter profiles for the notebooks, their validation, and the papermill runner.

A *profile* is a YAML file ``notebooks/profiles/<name>.yaml`` that sets notebook
parameters for one kind of run (``demo``: CPU, minutes, Tux Paint stamps;
``imagenet_full`` / ``food101_full``: the real data sets at paths the user gives)::

    description: "one line shown by `python -m zsl_utils profiles`"   # optional
    notebooks: ["02"]            # optional; what `run` executes by default (else all)
    common:                      # optional; applied to every notebook declaring the name
      seed: 0
      device: auto
    01_conse_construction:       # a section per notebook, keyed by the notebook's stem
      batch_size: 32             # overrides `common` for this notebook only

Every notebook declares its parameters in its first code cell, tagged ``parameters``,
one typed and commented assignment per line (``seed: int = 0  # random seed``). We read
that cell with papermill's own inspection, so what is validated here is exactly what
``papermill --help-notebook`` shows. Validation of *all* notebooks happens before any
notebook runs, and rejects:

* a parameter no notebook declares (with the close matches and the full list),
* a value of the wrong type: ``int``, ``float`` (an int is accepted), ``str``, ``bool``
  (never an int), ``list[T]``/``tuple[...]`` (YAML lists), ``dict[K, V]``,
  ``Optional[T]``, ``Union[...]``, ``Any``,
* a value outside the allowed values. **Convention:** the parameter's comment ends with
  ``(one of: "auto", "cpu", "cuda", "cuda:*", "mps")`` -- Python literals separated by
  commas; a string choice containing ``*`` or ``?`` is a shell-style pattern
  (``"cuda:*"`` admits ``"cuda:1"``). ``Literal[...]`` annotations cannot be used
  because papermill's parser drops any annotation containing quotes.
* a path that does not exist: a parameter whose name ends in ``_root``, ``_dir``,
  ``_path`` or ``_file`` and whose effective value (the profile's, else the notebook
  default) is a non-empty string must exist, relative paths being resolved against
  ``notebooks/`` (papermill's working directory). Output locations opt out with the
  marker ``(created if missing)`` in their comment.

``profile_name`` is set by the runner to the profile's name; profiles must not set it.
Executed copies go to ``runs/<profile>/<notebook stem>.ipynb``.
"""
from __future__ import annotations

import ast
import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from zsl_utils import config
from zsl_utils.errors import ParameterError, ZslError

PATH_SUFFIXES = ("_root", "_dir", "_path", "_file")
CREATED_MARKER = "(created if missing)"
RUNNER_PARAMETERS = ("profile_name",)  # set by the runner, never by a profile
KERNEL_NAME = "python3"
NOTEBOOK_PATTERN = "[0-9][0-9]_*.ipynb"
_CHOICES_RE = re.compile(r"\(one of:\s*(?P<items>[^)]*)\)")
_RESERVED_KEYS = ("common", "description", "notebooks")


class NotebookExecutionError(ZslError):
    """A notebook raised while the runner executed it."""


# --------------------------------------------------------------------------- notebooks
@dataclass(frozen=True)
class NotebookParameter:
    """One assignment of a notebook's ``parameters`` cell, as papermill infers it."""

    name: str
    type_name: str  # annotation text, or "None" when the line carries no annotation
    default: str  # source text of the default value
    help: str  # the trailing comment

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """Allowed values from a ``(one of: ...)`` comment, else None."""
        return parse_choices(self.help)

    @property
    def is_input_path(self) -> bool:
        """Whether a non-empty value must name an existing file or folder."""
        return self.name.endswith(PATH_SUFFIXES) and CREATED_MARKER not in self.help

    def default_value(self) -> Any:
        """The default as a Python value; raises ValueError if it is not a literal."""
        return ast.literal_eval(self.default)


def parse_choices(help_text: str) -> tuple[Any, ...] | None:
    """Read ``(one of: a, b, c)`` from a parameter comment; None when absent."""
    match = _CHOICES_RE.search(help_text)
    if match is None:
        return None
    try:
        return tuple(ast.literal_eval("(" + match.group("items") + ",)"))
    except (ValueError, SyntaxError) as exc:
        raise ParameterError(
            f"Cannot read the allowed values in the comment {help_text!r}: write them as "
            f'Python literals separated by commas, e.g. (one of: "auto", "cpu").'
        ) from exc


def list_notebooks(notebooks_dir: Path | None = None) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` of ``notebooks_dir``, in run order."""
    directory = Path(notebooks_dir) if notebooks_dir else config.NOTEBOOKS_DIR
    return sorted(directory.glob(NOTEBOOK_PATTERN))


def read_notebook_parameters(notebook: Path) -> dict[str, NotebookParameter]:
    """Parameters of ``notebook``'s ``parameters``-tagged cell, in declaration order."""
    notebook = Path(notebook).resolve()
    return dict(_read_parameters_cached(notebook, notebook.stat().st_mtime_ns))


@lru_cache(maxsize=64)
def _read_parameters_cached(notebook: Path, _mtime_ns: int) -> tuple[tuple[str, NotebookParameter], ...]:
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node
    from papermill.utils import find_first_tagged_cell_index

    try:
        nb = load_notebook_node(str(notebook))  # papermill's reader: fills in missing tags
    except Exception as exc:  # nbformat raises several unrelated types for a broken file
        raise ParameterError(
            f"Cannot read notebook {notebook}: {type(exc).__name__}: {exc}. Check that it is "
            f"valid notebook JSON (an unresolved merge conflict?) or regenerate it."
        ) from exc
    if find_first_tagged_cell_index(nb, "parameters") < 0:
        raise ParameterError(
            f"{notebook} has no cell tagged 'parameters': tag its first code cell "
            f'with metadata {{"tags": ["parameters"]}}.'
        )
    inferred = _infer_parameters(nb, name=KERNEL_NAME, language="python")
    return tuple(
        (p.name, NotebookParameter(p.name, p.inferred_type_name, p.default, p.help)) for p in inferred
    )


# --------------------------------------------------------------------------- types
def value_matches_type(value: Any, type_name: str) -> bool:
    """Whether a YAML value fits a parameter annotation (see the module docstring).

    An unannotated parameter (``type_name == "None"``) accepts anything. Raises
    ParameterError for an annotation this checker does not understand.
    """
    if type_name == "None":
        return True
    try:
        node = ast.parse(type_name, mode="eval").body
    except SyntaxError as exc:
        raise ParameterError(f"Cannot parse the annotation {type_name!r}.") from exc
    return _matches(value, node)


def _type_arguments(node: ast.Subscript) -> list[ast.expr]:
    return list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]


def _matches(value: Any, node: ast.expr) -> bool:
    if isinstance(node, ast.Constant) and node.value is None:
        return value is None
    if isinstance(node, ast.Name):
        return _matches_plain(value, node.id)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        return _matches_generic(value, node.value.id, _type_arguments(node))
    raise ParameterError(f"Unsupported annotation {ast.unparse(node)!r}.")


def _matches_plain(value: Any, name: str) -> bool:
    checks = {
        "Any": lambda v: True,
        "object": lambda v: True,
        "None": lambda v: v is None,
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        # papermill passes YAML sequences as Python lists, whatever the annotation says
        "list": lambda v: isinstance(v, list),
        "List": lambda v: isinstance(v, list),
        "tuple": lambda v: isinstance(v, list),
        "Tuple": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
        "Dict": lambda v: isinstance(v, dict),
    }
    if name not in checks:
        raise ParameterError(
            f"Unsupported annotation {name!r}: use int, float, str, bool, list[...], "
            f"dict[...], Optional[...] or Any in a parameters cell."
        )
    return checks[name](value)


def _matches_generic(value: Any, outer: str, args: list[ast.expr]) -> bool:
    if outer == "Optional":
        return value is None or _matches(value, args[0])
    if outer == "Union":
        return any(_matches(value, arg) for arg in args)
    if outer in ("list", "List"):
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value)
    if outer in ("tuple", "Tuple"):
        return _matches_tuple(value, args)
    if outer in ("dict", "Dict"):
        if len(args) != 2:
            raise ParameterError(f"Unsupported annotation {outer}[...] with {len(args)} argument(s): use dict[K, V].")
        key_type, value_type = args
        return isinstance(value, dict) and all(
            _matches(k, key_type) and _matches(v, value_type) for k, v in value.items()
        )
    raise ParameterError(f"Unsupported annotation {outer}[...]: use list, tuple, dict, Optional or Union.")


def _matches_tuple(value: Any, args: list[ast.expr]) -> bool:
    if not isinstance(value, list):
        return False
    if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
        return all(_matches(item, args[0]) for item in value)
    return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))


def value_in_choices(value: Any, choices: Sequence[Any]) -> bool:
    """Whether ``value`` is one of ``choices`` (string choices may be ``*`` patterns)."""
    for choice in choices:
        if isinstance(choice, str) and isinstance(value, str) and any(c in choice for c in "*?["):
            if fnmatch.fnmatchcase(value, choice):
                return True
        elif type(choice) is type(value) and choice == value:
            return True
        elif _is_number(choice) and _is_number(value) and choice == value:
            return True  # 1 and 1.0 are the same choice; True is never 1
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- profiles
class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ParameterError(
                    f"Key {key!r} appears twice in the same mapping ({key_node.start_mark}); "
                    f"keep only one."
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; a learning rate written
# that way would then be rejected as ill-typed, which surprises everyone.
_ProfileLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_text(text: str, source: str) -> Any:
    """Parse YAML with the profile rules; errors name ``source``."""
    try:
        return yaml.load(text, Loader=_ProfileLoader)
    except ParameterError as exc:
        raise ParameterError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ParameterError(f"{source} is not valid YAML: {exc}. Fix the syntax at that line.") from None


@dataclass(frozen=True)
class Profile:
    """A parsed profile: parameters for all notebooks and per notebook."""

    name: str
    path: Path
    description: str = ""
    notebooks: tuple[str, ...] = ()  # default selection (numbers or stems); empty: all
    common: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


def available_profiles(profiles_dir: Path | None = None) -> list[str]:
    """Names of the profiles in ``profiles_dir`` (default ``notebooks/profiles``)."""
    directory = Path(profiles_dir) if profiles_dir else config.PROFILES_DIR
    return sorted(p.stem for p in directory.glob("*.yaml"))


def profile_path(name_or_path: str | Path, profiles_dir: Path | None = None) -> Path:
    """The YAML file of a profile given by name (``demo``) or by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ParameterError(f"Profile file {candidate} does not exist: check the path.")
        return candidate
    directory = Path(profiles_dir) if profiles_dir else config.PROFILES_DIR
    path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_profiles(directory)) or "none"
        raise ParameterError(
            f"Unknown profile {str(name_or_path)!r}: no file {path}. Available profiles: {known}. "
            f"Pick one of them, or give the path of a .yaml file."
        )
    return path


def load_profile(name_or_path: str | Path, profiles_dir: Path | None = None) -> Profile:
    """Read and structurally check a profile (types are checked against notebooks later)."""
    path = profile_path(name_or_path, profiles_dir)
    data = load_yaml_text(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(data, dict):
        raise ParameterError(f"{path} must be a YAML mapping of sections, got {type(data).__name__}.")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ParameterError(f"{path}: 'description' must be a string.")
    notebooks = data.get("notebooks") or []
    if not isinstance(notebooks, list) or not all(isinstance(n, (str, int)) for n in notebooks):
        raise ParameterError(f"{path}: 'notebooks' must be a list of notebook numbers or stems, e.g. [\"02\"].")
    common = _section_mapping(data.get("common"), path, "common")
    sections = {
        str(key): _section_mapping(value, path, str(key))
        for key, value in data.items()
        if str(key) not in _RESERVED_KEYS
    }
    selection = tuple(f"{n:02d}" if isinstance(n, int) else n for n in notebooks)
    return Profile(path.stem, path, description, selection, common, sections)


def _section_mapping(value: Any, path: Path, section: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ParameterError(
            f"{path}: section {section!r} must map parameter names to values "
            f"(e.g. 'seed: 0'), got {value!r}."
        )
    for name in value:
        if name in RUNNER_PARAMETERS:
            raise ParameterError(
                f"{path}: section {section!r} sets {name!r}, which the runner sets to the "
                f"profile's name. Remove it from the profile."
            )
    return dict(value)


def parse_override(text: str) -> tuple[str | None, str, Any]:
    """Parse ``--set`` text: ``key=value`` or ``<notebook stem>.key=value``.

    The value is read as YAML (``3`` is an int, ``true`` a bool, ``a/b`` a string);
    ``key=`` gives the empty string.
    """
    target, sep, raw_value = text.partition("=")
    if not sep or not target.strip():
        raise ParameterError(
            f"--set {text!r}: expected key=value or <notebook stem>.key=value, e.g. --set seed=1."
        )
    section, _, key = target.strip().rpartition(".")
    value = load_yaml_text(raw_value, f"--set {text}") if raw_value.strip() else ""
    if key in RUNNER_PARAMETERS:
        raise ParameterError(f"--set {text!r}: {key!r} is set by the runner; choose --profile instead.")
    return (section or None), key, value


# --------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class NotebookRun:
    """One planned papermill execution."""

    notebook: Path
    output: Path
    parameters: dict[str, Any]


def _unknown_parameter_error(source: str, notebook: Path, name: str, declared: dict) -> ParameterError:
    close = difflib.get_close_matches(name, list(declared), n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    listing = ", ".join(f"{p.name} ({p.type_name})" for p in declared.values()) or "none"
    return ParameterError(
        f"{source}: unknown parameter {name!r} for notebook {notebook.name}.{hint} "
        f"The notebook's parameters are: {listing}. Fix the name in the profile, "
        f"or declare the parameter in the notebook's parameters cell."
    )


def check_value(source: str, notebook: Path, parameter: NotebookParameter, value: Any) -> None:
    """Raise ParameterError if ``value`` has the wrong type or is not an allowed value."""
    try:
        type_ok = value_matches_type(value, parameter.type_name)
    except ParameterError as exc:
        raise ParameterError(f"{notebook.name}, parameter {parameter.name!r}: {exc}") from None
    choices = parameter.choices
    allowed = f" Allowed values: {', '.join(map(repr, choices))}." if choices else ""
    if not type_ok:
        raise ParameterError(
            f"{source}: parameter {parameter.name!r} of {notebook.name} expects "
            f"{parameter.type_name}, got {value!r} ({type(value).__name__}).{allowed} "
            f"Fix the value in the profile."
        )
    if choices and not value_in_choices(value, choices):
        raise ParameterError(
            f"{source}: parameter {parameter.name!r} of {notebook.name} got {value!r}, "
            f"which is not allowed.{allowed}"
        )


def check_path(source: str, notebook: Path, parameter: NotebookParameter, value: Any, notebooks_dir: Path) -> None:
    """Raise ParameterError if an input-path parameter names nothing on disk."""
    if not parameter.is_input_path or not isinstance(value, str) or not value.strip():
        return
    resolved = (notebooks_dir / Path(value).expanduser()).resolve()
    if not resolved.exists():
        raise ParameterError(
            f"{source}: parameter {parameter.name!r} of {notebook.name} points to {value!r} "
            f"({resolved}), which does not exist. Edit the profile, or pass "
            f"--set {parameter.name}=/real/path (relative paths are taken from {notebooks_dir})."
        )


def resolve_parameters(
    profile: Profile,
    notebook: Path,
    overrides: Iterable[tuple[str | None, str, Any]] = (),
    check_paths: bool = True,
) -> dict[str, Any]:
    """Validated papermill parameters of ``profile`` (plus ``--set`` overrides) for one notebook.

    ``common`` values apply when the notebook declares the name; the notebook's own
    section and then the overrides take precedence. ``profile_name`` is added.
    """
    notebook = Path(notebook)
    declared = read_notebook_parameters(notebook)
    chosen: dict[str, tuple[str, Any]] = {}  # name -> (source for messages, value)
    for name, value in profile.common.items():
        if name in declared:
            chosen[name] = (f"{profile.path} [common]", value)
    for name, value in profile.sections.get(notebook.stem, {}).items():
        if name not in declared:
            raise _unknown_parameter_error(f"{profile.path} [{notebook.stem}]", notebook, name, declared)
        chosen[name] = (f"{profile.path} [{notebook.stem}]", value)
    for section, name, value in overrides:
        if section in (None, notebook.stem) and name in declared:
            prefix = f"{section}." if section else ""
            chosen[name] = (f"--set {prefix}{name}", value)
    for name, (source, value) in chosen.items():
        check_value(source, notebook, declared[name], value)
    if check_paths:
        _check_effective_paths(chosen, declared, notebook)
    parameters = {name: value for name, (_, value) in chosen.items()}
    if "profile_name" in declared:
        parameters["profile_name"] = profile.name
    return parameters


def _check_effective_paths(chosen: dict[str, tuple[str, Any]], declared: dict, notebook: Path) -> None:
    for parameter in declared.values():
        if not parameter.is_input_path:
            continue
        if parameter.name in chosen:
            source, value = chosen[parameter.name]
        else:
            try:
                source, value = f"{notebook.name} (default)", parameter.default_value()
            except (ValueError, SyntaxError):
                continue  # a computed default cannot be checked before running
        check_path(source, notebook, parameter, value, notebook.parent.resolve())


def select_notebooks(all_notebooks: list[Path], wanted: Sequence[str] | None) -> list[Path]:
    """Notebooks matching ``wanted`` (numbers like ``01`` or full stems), in run order."""
    if not wanted:
        return list(all_notebooks)
    selected = []
    for item in wanted:
        matches = [nb for nb in all_notebooks if nb.stem == item or nb.stem.split("_", 1)[0] == item]
        if not matches:
            known = ", ".join(nb.stem for nb in all_notebooks) or "none"
            raise ParameterError(
                f"Notebook selection {item!r} (from --notebooks or the profile's 'notebooks' list) "
                f"matches no notebook. Available: {known}."
            )
        selected.extend(nb for nb in matches if nb not in selected)
    return sorted(selected)


def _check_profile_names(profile: Profile, all_notebooks: list[Path], notebooks_dir: Path, overrides: Sequence) -> None:
    """Reject sections, common keys and overrides that no notebook could use (typos)."""
    by_stem = {nb.stem: nb for nb in all_notebooks}
    known = ", ".join(by_stem) or "none"
    for section in profile.sections:
        if section not in by_stem:
            raise ParameterError(
                f"{profile.path}: section {section!r} names no notebook in {notebooks_dir}. "
                f"Sections are notebook stems: {known}. Fix or remove the section."
            )
    declared_anywhere = {name for nb in all_notebooks for name in read_notebook_parameters(nb)}
    for name in profile.common:
        if name not in declared_anywhere:
            close = difflib.get_close_matches(name, list(declared_anywhere), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ParameterError(
                f"{profile.path} [common]: no notebook declares a parameter {name!r}.{hint} "
                f"Known parameters: {', '.join(sorted(declared_anywhere)) or 'none'}."
            )
    for section, name, _ in overrides:
        if section is not None and section not in by_stem:
            raise ParameterError(f"--set {section}.{name}: no notebook {section!r}. Notebooks: {known}.")
        owners = [by_stem[section]] if section else all_notebooks
        names = sorted({n for nb in owners for n in read_notebook_parameters(nb)})
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ParameterError(
                f"--set {(section + '.') if section else ''}{name}: no notebook declares {name!r}.{hint} "
                f"Known parameters: {', '.join(names) or 'none'}."
            )


def plan_runs(
    profile: str | Path | Profile = "demo",
    notebooks: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    notebooks_dir: Path | None = None,
    runs_dir: Path | None = None,
    profiles_dir: Path | None = None,
    check_paths: bool = True,
) -> list[NotebookRun]:
    """Validate everything and return the executions to perform, without running any.

    ``notebooks`` (numbers or stems) defaults to the profile's ``notebooks`` list, else
    all. Every section and parameter is checked against every notebook present (a typo
    fails even for a notebook not selected); paths are checked for selected ones.
    """
    if not isinstance(profile, Profile):
        profile = load_profile(profile, profiles_dir)
    notebooks_dir = Path(notebooks_dir) if notebooks_dir else config.NOTEBOOKS_DIR
    all_notebooks = list_notebooks(notebooks_dir)
    if not all_notebooks:
        raise ParameterError(f"No numbered notebooks (NN_*.ipynb) in {notebooks_dir}.")
    parsed_overrides = [parse_override(text) for text in overrides]
    _check_profile_names(profile, all_notebooks, notebooks_dir, parsed_overrides)
    selected = set(select_notebooks(all_notebooks, notebooks or profile.notebooks))
    output_dir = (Path(runs_dir) if runs_dir else config.RUNS_DIR) / profile.name
    plan = []
    for notebook in all_notebooks:
        parameters = resolve_parameters(profile, notebook, parsed_overrides, check_paths and notebook in selected)
        if notebook in selected:
            plan.append(NotebookRun(notebook, output_dir / notebook.name, parameters))
    return plan


def describe_plan(plan: Sequence[NotebookRun]) -> str:
    """Human-readable summary of a plan (used by ``--dry-run``)."""
    lines = []
    for run in plan:
        lines.append(f"{run.notebook.name} -> {run.output}")
        lines.extend(f"    {name} = {value!r}" for name, value in run.parameters.items())
    return "\n".join(lines)


# --------------------------------------------------------------------------- runner
def execute_plan(plan: Sequence[NotebookRun], log_output: bool = False, progress_bar: bool = True) -> list[Path]:
    """Run each planned notebook with papermill, in order; stop at the first failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    outputs = []
    for run in plan:
        config.ensure_dir(run.output.parent)
        try:
            papermill.execute_notebook(
                str(run.notebook),
                str(run.output),
                parameters=run.parameters,
                kernel_name=KERNEL_NAME,
                cwd=str(run.notebook.parent),
                progress_bar=progress_bar,
                log_output=log_output,
            )
        except PapermillExecutionError as exc:
            raise NotebookExecutionError(
                f"{run.notebook.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}. "
                f"The executed copy with the full traceback is {run.output}."
            ) from exc
        outputs.append(run.output)
    return outputs


def run_profile(
    profile: str | Path = "demo",
    notebooks: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    log_output: bool = False,
    **paths: Path | None,
) -> list[NotebookRun]:
    """Validate all notebooks for ``profile`` and (unless ``dry_run``) execute them.

    ``paths`` may hold ``notebooks_dir``, ``runs_dir`` and ``profiles_dir`` (tests).
    """
    plan = plan_runs(profile, notebooks, overrides, **paths)
    if not dry_run:
        execute_plan(plan, log_output=log_output)
    return plan

