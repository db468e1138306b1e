"""Committed notebooks are clean and declare typed, commented parameters.

The parameters cell is read with papermill's own inspection and its
``--help-notebook`` command, so what is checked is what a user sees. The checker is
itself tested on a deliberately dirty fixture notebook.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from click.testing import CliRunner
from papermill.cli import papermill as papermill_cli

from zsl_utils import config, profiles
from zsl_utils.errors import ParameterError

sys.path.insert(0, str(config.PROJ_ROOT / "tools"))
import demo_outputs  # noqa: E402  (tools/ is not a package)

REQUIRED_PARAMETERS = {"profile_name": "str", "seed": "int", "device": "str"}


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def markdown_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Markdown that renders wrongly: control characters (a ``"\\alpha"`` written without ``r`` becomes
    BEL + "lpha") and a line that is a lone backslash (a line-continuation escape left in the text)."""
    problems = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        controls = sorted({f"U+{ord(ch):04X}" for ch in cell.source if ord(ch) < 32 and ch not in "\n\t"})
        if controls:
            problems.append(f"markdown cell {index} holds control characters {controls}")
        if any(line.strip() == "\\" for line in cell.source.splitlines()):
            problems.append(f"markdown cell {index} has a line that is a lone backslash")
    return problems


def parameters_cell_problems(path: Path) -> list[str]:
    """Problems with the placement and content of the ``parameters`` cell."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append("metadata.kernelspec.name must be 'python3' (papermill --help-notebook needs it)")
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    if len(tagged) != 1:
        return problems + [f"{len(tagged)} cells are tagged 'parameters' (need exactly one)"]
    if not code or tagged[0] != code[0]:
        problems.append("the 'parameters' cell is not the first code cell")
    source = nb.cells[tagged[0]].source
    declared = _assigned_names(source, problems)
    inferred = profiles.read_notebook_parameters(path)
    if list(inferred) != declared:
        dropped = [name for name in declared if name not in inferred]
        problems.append(
            f"papermill does not see {dropped or 'the same order'}: avoid '=' inside comments and "
            f"annotations with '|' or quotes (use Optional[...], '(one of: ...)' for choices and "
            f"'(at least N)' for bounds)"
        )
    for parameter in inferred.values():
        problems.extend(_parameter_problems(parameter))
    for name, type_name in REQUIRED_PARAMETERS.items():
        if name not in inferred or inferred[name].type_name != type_name:
            problems.append(f"missing required parameter `{name}: {type_name}`")
    if "profile_name" in inferred and inferred["profile_name"].default not in ('"demo"', "'demo'"):
        problems.append('profile_name must default to "demo"')
    return problems


def _assigned_names(source: str, problems: list[str]) -> list[str]:
    """Names of the cell's ``name: type = value`` lines; anything else is a problem."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        problems.append(f"parameters cell does not parse: {exc}")
        return []
    names = []
    for statement in tree.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            names.append(statement.target.id)
        else:
            problems.append(f"line {statement.lineno}: only `name: type = value  # comment` belongs in the parameters cell")
    return names


def _parameter_problems(parameter: profiles.NotebookParameter) -> list[str]:
    name = parameter.name
    if parameter.type_name == "None":
        return [f"{name} has no type annotation"]
    problems = [] if parameter.help else [f"{name} has no comment"]
    try:
        default = parameter.default_value()
    except (ValueError, SyntaxError):
        return problems + [f"{name}: default {parameter.default} is not a literal"]
    try:
        if not profiles.value_matches_type(default, parameter.type_name):
            return problems + [f"{name}: default {default!r} is not a {parameter.type_name}"]
        rule = parameter.broken_rule(default)
    except ParameterError as exc:
        return problems + [f"{name}: {exc}"]
    return problems + ([f"{name}: default {default!r} breaks its comment's rule: {rule}"] if rule else [])


def help_notebook_output(path: Path) -> str:
    """What ``papermill --help-notebook <path>`` prints."""
    result = CliRunner().invoke(papermill_cli, ["--help-notebook", str(path)])
    assert result.exit_code == 0, result.output
    return result.output


# --------------------------------------------------------------------------- the checker
def _write(path: Path, cells: list[nbformat.NotebookNode], kernel: str = "python3") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
    nb.cells = cells
    nbformat.write(nb, path)
    return path


GOOD_PARAMETERS = (
    'profile_name: str = "demo"  # profile the runner was given\n'
    "seed: int = 0  # random seed\n"
    'device: str = "auto"  # torch device (one of: "auto", "cpu", "cuda", "cuda:*", "mps")\n'
    "top_k: int = 5  # hits counted (one of: 1, 2, 5, 10)\n"
    "ks: list[int] = [1, 5]  # cut-offs (at least 1) (non-empty) (increasing)\n"
)


def test_checker_accepts_clean_notebook(tmp_path):
    cells = [
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell(GOOD_PARAMETERS, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print(seed)"),
    ]
    path = _write(tmp_path / "01_ok.ipynb", cells)
    assert parameters_cell_problems(path) == []
    shown = help_notebook_output(path)
    assert "seed: int (default 0)" in shown and "random seed" in shown


def test_checker_flags_every_kind_of_dirt(tmp_path):
    dirty_parameters = (
        "seed = 0  # untyped\n"
        "top_k: int = 3  # hits (one of: 1, 5)\n"
        "ks: list[int] = [5, 0]  # cut-offs (at least 1)\n"
        "steps: int = 10  # training steps (at least 1) (>= 1)\n"
        "lr: float = 0.1  # step (lr=0.1 in the paper)\n"
        "root: str | None = None  # data\n"
        "size: int = 4\n"
        "import os\n"
    )
    executed = nbformat.v4.new_code_cell("x = 1", execution_count=3)
    executed.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    cells = [
        executed,
        nbformat.v4.new_code_cell(dirty_parameters, metadata={"tags": ["parameters"]}),
    ]
    path = _write(tmp_path / "01_dirty.ipynb", cells, kernel="python")
    problems = parameters_cell_problems(path)
    expected_fragments = [
        "kernelspec.name must be 'python3'",
        "not the first code cell",
        "line 1: only `name: type = value",  # seed has no annotation
        "line 8: only `name: type = value",  # import
        "papermill does not see ['steps', 'lr', 'root']",  # '=' in a comment, '|' in an annotation
        "size has no comment",
        "top_k: default 3 breaks its comment's rule: it must be one of 1, 5",
        "ks: default [5, 0] breaks its comment's rule: each item must be at least 1",
        "missing required parameter `profile_name: str`",
        "missing required parameter `seed: int`",
        "missing required parameter `device: str`",
    ]
    for fragment in expected_fragments:
        assert any(fragment in problem for problem in problems), (fragment, problems)


def test_checker_flags_second_parameters_cell(tmp_path):
    cells = [nbformat.v4.new_code_cell(GOOD_PARAMETERS, metadata={"tags": ["parameters"]}) for _ in range(2)]
    path = _write(tmp_path / "01_two.ipynb", cells)
    assert parameters_cell_problems(path) == ["2 cells are tagged 'parameters' (need exactly one)"]


# --------------------------------------------------------------------------- committed notebooks
COMMITTED = profiles.list_notebooks()
NOTEBOOK_PARAMS = [pytest.param(path, id=path.stem) for path in COMMITTED] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no numbered notebooks committed yet"))
]


def _executed(sources: list[str], counts: list[int | None]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src, execution_count=n) for src, n in zip(sources, counts)]
    return nb


def test_staleness_checker_on_hand_built_notebooks():
    nb = _executed(["x = 1", "print(x)"], [1, 2])
    assert demo_outputs.staleness_problems(nb) == ["no demo outputs recorded: run `make notebooks`"]
    nb.metadata[demo_outputs.METADATA_KEY] = {"sources_sha256": demo_outputs.sources_hash(nb),
                                              "library_sha256": demo_outputs.library_hash()}
    assert demo_outputs.staleness_problems(nb) == []
    nb.cells[1].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[])]
    nb.cells[0].execution_count = 3  # run out of order
    assert demo_outputs.staleness_problems(nb) == [
        "cell 1 shows an error", "code cells were not executed once each, in order: execution counts [3, 2]"]
    nb.cells[1].outputs, nb.cells[0].execution_count = [], 1
    nb.cells[1].source = "print(x + 1)"  # edited after the run
    assert demo_outputs.staleness_problems(nb) == ["cells were edited after the outputs were made: run `make notebooks`"]
    nb.metadata[demo_outputs.METADATA_KEY]["sources_sha256"] = demo_outputs.sources_hash(nb)
    nb.metadata[demo_outputs.METADATA_KEY]["library_sha256"] = "0" * 64
    assert demo_outputs.staleness_problems(nb) == ["zsl_utils changed after the outputs were made: run `make notebooks`"]


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_committed_outputs_are_the_demo_run_of_the_current_sources(notebook):
    assert demo_outputs.staleness_problems(nbformat.read(notebook, as_version=4)) == []


def _run_nbval(notebook: Path) -> subprocess.CompletedProcess:
    sanitize = config.NOTEBOOKS_DIR / "nbval_sanitize.cfg"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", "--nbval-sanitize-with", str(sanitize), str(notebook)],
                          capture_output=True, text=True, cwd=notebook.parent, timeout=300)


@pytest.mark.slow
def test_nbval_fails_when_a_committed_key_number_is_edited(tmp_path):
    cells = [nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(f'hit@1 = {100 * 7 / 16:.1f} %, took 0.42 s')",
                                       execution_count=1),
             nbformat.v4.new_code_cell("print('not compared: 3')", execution_count=2)]
    cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hit@1 = 43.8 %, took 9.99 s\n")]
    cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="not compared: 4\n")]
    path = _write(tmp_path / "01_toy.ipynb", cells)
    passed = _run_nbval(path)
    assert passed.returncode == 0, passed.stdout  # the duration is sanitised, the unmarked cell not compared
    cells[0].outputs[0].text = "hit@1 = 43.9 %, took 9.99 s\n"
    path = _write(tmp_path / "01_toy.ipynb", cells)
    failed = _run_nbval(path)
    assert failed.returncode == 1 and "43.9" in failed.stdout, failed.stdout


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_marked_cells_carry_committed_outputs(notebook):
    """nbval skips a marked cell whose committed output is empty: every marked cell must have one."""
    cells = _code_cells(nbformat.read(notebook, as_version=4))
    empty = [c.source.splitlines()[1][:60] for c in cells
             if c.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT") and not c.get("outputs")]
    assert not empty, f"{notebook.name}: marked cells without committed outputs: {empty}"


def test_markdown_checker_flags_control_characters_and_stray_escapes():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("weights $\x07lpha$ and $\\beta$"),
                nbformat.v4.new_markdown_cell("\\\n## A title"),
                nbformat.v4.new_markdown_cell("$\\alpha$, a line ending in \\\\ inside math is fine\n"),
                nbformat.v4.new_code_cell("x = '\\\\'")]
    assert markdown_problems(nb) == ["markdown cell 0 holds control characters ['U+0007']",
                                     "markdown cell 1 has a line that is a lone backslash"]


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_committed_markdown_renders_as_written(notebook):
    assert markdown_problems(nbformat.read(notebook, as_version=4)) == []


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_notebook_matches_its_paired_source(notebook):
    """The .ipynb and its jupytext .py hold the same cells (run `jupytext --sync notebooks/NN_*.py`)."""
    paired = notebook.with_suffix(".py")
    assert paired.is_file(), f"{notebook.name} has no paired source {paired.name}"
    cells = [(c.cell_type, c.source.strip()) for c in nbformat.read(notebook, as_version=4).cells]
    source_cells = [(c.cell_type, c.source.strip()) for c in jupytext.read(paired).cells]
    assert cells == source_cells, f"{notebook.name} and {paired.name} differ: run jupytext --sync {paired}"


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_committed_notebook_parameters_are_typed_and_commented(notebook):
    assert parameters_cell_problems(notebook) == []


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_help_notebook_lists_every_parameter_with_type_and_comment(notebook):
    shown = help_notebook_output(notebook)
    for parameter in profiles.read_notebook_parameters(notebook).values():
        assert f"{parameter.name}: {parameter.type_name} (default {parameter.default})" in shown
        assert parameter.help in shown


@pytest.mark.parametrize("notebook", NOTEBOOK_PARAMS)
def test_committed_notebook_marks_key_numbers_for_nbval(notebook):
    cells = _code_cells(nbformat.read(notebook, as_version=4))
    marked = [cell for cell in cells if cell.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")]
    assert marked, f"{notebook.name}: mark a few key numeric cells with '# NBVAL_CHECK_OUTPUT' as first line"
