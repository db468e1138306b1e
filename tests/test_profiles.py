"""Profiles, their validation against notebook parameter cells, the runner and its CLI.

Fixture notebooks are built with nbformat in tmp_path; a few are really executed
with papermill (kernel python3) to prove the runner injects what it validated.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from zsl_utils import config, profiles
from zsl_utils.__main__ import main
from zsl_utils.errors import ParameterError

PARAMS_01 = '''profile_name: str = "demo"  # profile the runner was given
seed: int = 0  # random seed
device: str = "auto"  # torch device (one of: "auto", "cpu", "cuda", "cuda:*", "mps")
batch_size: int = 4  # images per forward pass
learning_rate: float = 0.1  # step size
use_cache: bool = True  # reuse cached features
labels: list[str] = ["a"]  # class names
stamps_root: str = ""  # Tux Paint stamps folder ("" means the fetched copy)
out_dir: str = "results"  # where tables go (created if missing)
top_k: int = 5  # labels listed per image (at least 1)
ks: list[int] = [1, 5]  # cut-offs k (at least 1) (non-empty) (increasing)
fraction: float = 0.5  # share held out (above 0) (below 1)
'''
PARAMS_02 = '''profile_name: str = "demo"  # profile the runner was given
seed: int = 0  # random seed
fail: bool = False  # raise on purpose (tests the runner's error path)
'''
PRINT_CELL = "print(profile_name, seed, {extra})"
KERNEL_CELL = "import sys\nprint(sys.prefix)"


def write_notebook(path: Path, parameters_source: str, *body: str) -> Path:
    """A minimal notebook: a parameters-tagged cell followed by ``body`` code cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters_source, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in body]
    nbformat.write(nb, path)
    return path


@pytest.fixture()
def project(tmp_path: Path) -> dict[str, Path]:
    """Two fixture notebooks and a profiles folder."""
    notebooks = tmp_path / "notebooks"
    (notebooks / "profiles").mkdir(parents=True)
    write_notebook(notebooks / "01_alpha.ipynb", PARAMS_01, PRINT_CELL.format(extra="batch_size, learning_rate, device"))
    write_notebook(notebooks / "02_beta.ipynb", PARAMS_02, "if fail:\n    raise RuntimeError('asked to fail')", PRINT_CELL.format(extra="fail"), KERNEL_CELL)
    return {"notebooks": notebooks, "profiles": notebooks / "profiles", "runs": tmp_path / "runs"}


def write_profile(project: dict[str, Path], name: str, text: str) -> Path:
    path = project["profiles"] / f"{name}.yaml"
    path.write_text(text)
    return path


def plan(project: dict[str, Path], profile: str, **kwargs) -> list[profiles.NotebookRun]:
    return profiles.plan_runs(
        profile, notebooks_dir=project["notebooks"], runs_dir=project["runs"], profiles_dir=project["profiles"], **kwargs
    )


# --------------------------------------------------------------------------- parsing
def test_parameters_are_read_as_papermill_infers_them(project):
    params = profiles.read_notebook_parameters(project["notebooks"] / "01_alpha.ipynb")
    assert list(params)[:4] == ["profile_name", "seed", "device", "batch_size"]
    assert params["learning_rate"].type_name == "float"
    assert params["labels"].type_name == "list[str]"
    assert params["batch_size"].help == "images per forward pass"
    assert params["device"].choices == ("auto", "cpu", "cuda", "cuda:*", "mps")
    assert params["seed"].choices is None
    assert params["stamps_root"].is_input_path and not params["out_dir"].is_input_path
    assert not params["seed"].is_input_path
    assert params["labels"].default_value() == ["a"]


def test_notebook_without_parameters_cell_is_rejected(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x: int = 1  # x")]
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ParameterError, match=r"01_x.ipynb has no cell tagged 'parameters'"):
        profiles.read_notebook_parameters(path)
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, path)
    with pytest.raises(ParameterError, match=r"01_x.ipynb has no metadata.kernelspec.name: set it to 'python3'"):
        profiles.read_notebook_parameters(path)


def test_broken_notebook_file_is_named(tmp_path):
    path = tmp_path / "01_broken.ipynb"
    path.write_text('{"cells": [\n<<<<<<< HEAD\n')
    with pytest.raises(ParameterError, match=r"Cannot read notebook .*01_broken.ipynb.*valid notebook JSON"):
        profiles.read_notebook_parameters(path)


@pytest.mark.parametrize(
    "value, type_name, expected",
    [
        (3, "int", True),
        (True, "int", False),  # bool is an int in Python, never in a profile
        ("3", "int", False),
        (3, "float", True),  # an int is a fine float
        (2.5, "float", True),
        (False, "float", False),
        (2.5, "int", False),
        ("x", "str", True),
        (None, "str", False),
        (None, "Optional[str]", True),
        ("x", "Optional[str]", True),
        (1, "Optional[str]", False),
        (["a", "b"], "list[str]", True),
        (["a", 1], "list[str]", False),
        ("a", "list[str]", False),
        ([[1], [2, 3]], "list[list[int]]", True),
        ([1.5], "List[int]", False),
        (None, "Optional[list[float]]", True),
        ([1, 2.5], "Optional[list[float]]", True),
        ([1], "Any", True),
        ("anything", "None", True),  # unannotated: papermill reports type "None"
    ],
)
def test_value_matches_type(value, type_name, expected):
    assert profiles.value_matches_type(value, type_name) is expected


def test_unsupported_annotation_is_named():
    with pytest.raises(ParameterError, match="Unsupported annotation 'Path'"):
        profiles.value_matches_type("x", "Path")
    with pytest.raises(ParameterError, match=r"Unsupported annotation 'tuple\[int, int\]': use int, float"):
        profiles.value_matches_type([1, 2], "tuple[int, int]")


def parse_choices(comment: str):
    return profiles.NotebookParameter("x", "str", '""', comment).choices


def test_choices_and_patterns():
    choices = parse_choices('device (one of: "auto", "cpu", "cuda:*")')
    assert choices == ("auto", "cpu", "cuda:*")
    assert profiles.value_in_choices("cuda:1", choices)
    assert not profiles.value_in_choices("cuda", choices)
    assert not profiles.value_in_choices("gpu", choices)
    assert parse_choices("k (one of: 1, 5, 10)") == (1, 5, 10)
    assert not profiles.value_in_choices(True, (1, 5))  # True == 1 must not pass
    assert profiles.value_in_choices(1.0, (0.5, 1)) and not profiles.value_in_choices(2.0, (0.5, 1))
    assert parse_choices("plain comment") is None
    with pytest.raises(ParameterError, match="allowed values"):
        parse_choices("bad (one of: auto, cpu)")


# --------------------------------------------------------------------------- profiles
def test_profile_sections_common_and_precedence(project):
    write_profile(
        project,
        "p",
        "description: test profile\ncommon:\n  seed: 7\n  device: cpu\n"
        "01_alpha:\n  batch_size: 2\n  learning_rate: 1e-3\n  seed: 8\n",
    )
    runs = plan(project, "p", overrides=["02_beta.seed=9", "labels=[x, y]"])
    by_stem = {run.notebook.stem: run for run in runs}
    assert by_stem["01_alpha"].parameters == {
        "seed": 8,  # the notebook's section beats common
        "device": "cpu",
        "batch_size": 2,
        "learning_rate": 0.001,  # YAML 1.1 would have read '1e-3' as a string
        "labels": ["x", "y"],
        "profile_name": "p",
    }
    # `device` is not declared by 02, so common does not apply there; --set beats common
    assert by_stem["02_beta"].parameters == {"seed": 9, "profile_name": "p"}
    assert by_stem["01_alpha"].output == project["runs"] / "p" / "01_alpha.ipynb"


def test_unknown_profile_lists_available(project):
    write_profile(project, "demo", "common:\n  seed: 1\n")
    with pytest.raises(ParameterError, match=r"Unknown profile 'demoo'.*Available profiles: demo"):
        plan(project, "demoo")


def test_unknown_parameter_names_file_notebook_parameter_and_list(project):
    path = write_profile(project, "p", "01_alpha:\n  batch_sise: 3\n")
    with pytest.raises(ParameterError) as info:
        plan(project, "p")
    message = str(info.value)
    assert str(path) in message and "01_alpha" in message
    assert "'batch_sise'" in message and "Did you mean 'batch_size'" in message
    assert "learning_rate (float)" in message  # the notebook's parameters are listed


def test_wrong_type_names_parameter_expected_type_value_and_choices(project):
    write_profile(project, "p", "01_alpha:\n  batch_size: eight\n")
    with pytest.raises(ParameterError, match=r"'batch_size' of 01_alpha.ipynb expects int, got 'eight' \(str\)"):
        plan(project, "p")
    write_profile(project, "q", "common:\n  device: 1\n")
    with pytest.raises(ParameterError, match=r"expects str, got 1 \(int\).*Allowed values: 'auto', 'cpu'"):
        plan(project, "q")
    write_profile(project, "r", "common:\n  seed: true\n")
    with pytest.raises(ParameterError, match=r"'seed' of 01_alpha.ipynb expects int, got True"):
        plan(project, "r")


def test_value_outside_choices_lists_allowed_values(project):
    write_profile(project, "p", "common:\n  device: gpu\n")
    with pytest.raises(ParameterError, match=r"'device' of 01_alpha.ipynb got 'gpu'.*'auto', 'cpu', 'cuda', 'cuda:\*', 'mps'"):
        plan(project, "p")
    write_profile(project, "ok", "common:\n  device: 'cuda:1'\n")
    assert plan(project, "ok")[0].parameters["device"] == "cuda:1"


@pytest.mark.parametrize(
    "setting, rule",
    [
        ("top_k: 0", "it must be at least 1"),
        ("ks: [1, 0]", "each item must be at least 1"),
        ("ks: []", "it needs at least one value"),
        ("ks: [5, 1]", "its values must increase, without repeats"),
        ("ks: [1, 1]", "its values must increase, without repeats"),
        ("fraction: 1.0", "it must be below 1"),
        ("fraction: 0", "it must be above 0"),
    ],
)
def test_value_outside_range_names_parameter_rule_and_source(project, setting, rule):
    path = write_profile(project, "p", f"01_alpha:\n  {setting}\n")
    with pytest.raises(ParameterError) as info:
        plan(project, "p")
    name, value = setting.split(": ")
    assert f"{path} [01_alpha]: parameter '{name}' of 01_alpha.ipynb got {value}" in str(info.value)
    assert rule in str(info.value) and "Fix the value in the profile" in str(info.value)


def test_value_inside_range_is_accepted(project):
    write_profile(project, "p", "01_alpha:\n  top_k: 1\n  ks: [1, 2, 10]\n  fraction: 0.99\n")
    assert plan(project, "p")[0].parameters["ks"] == [1, 2, 10]
    with pytest.raises(ParameterError, match=r"--set top_k: parameter 'top_k' of 01_alpha.ipynb got -3"):
        plan(project, "p", overrides=["top_k=-3"])


def test_missing_data_root_names_parameter_path_and_fix(project):
    write_profile(project, "full", "01_alpha:\n  stamps_root: /path/to/stamps\n")
    with pytest.raises(ParameterError) as info:
        plan(project, "full")
    message = str(info.value)
    assert "'stamps_root'" in message and "/path/to/stamps" in message and "does not exist" in message
    assert "--set stamps_root=" in message
    # the fix works: an existing folder, relative to notebooks/ (papermill's cwd)
    (project["notebooks"] / "stamps").mkdir()
    runs = plan(project, "full", overrides=["stamps_root=stamps"])
    assert runs[0].parameters["stamps_root"] == "stamps"
    # outputs opt out with "(created if missing)"; paths are checked for selected notebooks only
    assert plan(project, "full", notebooks=["02"])[0].notebook.stem == "02_beta"


def test_nonexistent_default_path_is_caught(project):
    source = PARAMS_02 + 'vectors_file: str = "missing.npy"  # word vectors\n'
    write_notebook(project["notebooks"] / "02_beta.ipynb", source)
    write_profile(project, "p", "")
    with pytest.raises(ParameterError, match=r"02_beta.ipynb \(default\): parameter 'vectors_file'.*missing.npy"):
        plan(project, "p")


def test_typos_in_sections_common_and_overrides(project):
    write_profile(project, "p", "01_alfa:\n  seed: 1\n")
    with pytest.raises(ParameterError, match=r"section '01_alfa' names no notebook.*01_alpha, 02_beta"):
        plan(project, "p")
    write_profile(project, "q", "common:\n  sed: 1\n")
    with pytest.raises(ParameterError, match=r"\[common\]: unknown parameter 'sed'. Did you mean 'seed'"):
        plan(project, "q")
    write_profile(project, "ok", "")
    with pytest.raises(ParameterError, match=r"--set sed: unknown parameter 'sed'. Did you mean 'seed'"):
        plan(project, "ok", overrides=["sed=1"])
    with pytest.raises(ParameterError, match=r"--set 02_beta.batch_size: unknown parameter .*Parameters of 02_beta"):
        plan(project, "ok", overrides=["02_beta.batch_size=1"])
    with pytest.raises(ParameterError, match=r"--set 07_x.seed: no notebook '07_x'. Notebooks: 01_alpha, 02_beta"):
        plan(project, "ok", overrides=["07_x.seed=1"])
    with pytest.raises(ParameterError, match=r"expected key=value"):
        plan(project, "ok", overrides=["seed"])
    with pytest.raises(ParameterError, match=r"--set seed: parameter 'seed' of 01_alpha.ipynb expects int"):
        plan(project, "ok", overrides=["seed=abc"])


def test_profile_file_structure_errors(project):
    write_profile(project, "dup", "common:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ParameterError, match=r"dup.yaml.*'seed' appears twice"):
        plan(project, "dup")
    write_profile(project, "pn", "common:\n  profile_name: x\n")
    with pytest.raises(ParameterError, match=r"sets 'profile_name', which the runner sets"):
        plan(project, "pn")
    write_profile(project, "list", "- seed\n")
    with pytest.raises(ParameterError, match=r"must be a YAML mapping"):
        plan(project, "list")
    write_profile(project, "bad", "common: [\n")
    with pytest.raises(ParameterError, match=r"bad.yaml is not valid YAML"):
        plan(project, "bad")


def test_parse_override_values():
    assert profiles.parse_override("seed=3") == (None, "seed", 3)
    assert profiles.parse_override("01_conse_construction.device=cuda:1") == ("01_conse_construction", "device", "cuda:1")
    assert profiles.parse_override("data_root=") == (None, "data_root", "")
    assert profiles.parse_override("lr=1e-4") == (None, "lr", 1e-4)
    assert profiles.parse_override("flag=true") == (None, "flag", True)


def test_notebook_selection(project):
    all_notebooks = profiles.list_notebooks(project["notebooks"])
    assert [nb.stem for nb in all_notebooks] == ["01_alpha", "02_beta"]
    assert profiles.select_notebooks(all_notebooks, ["02", "01_alpha"]) == all_notebooks
    with pytest.raises(ParameterError, match=r"selection '07' .*matches no notebook. Available: 01_alpha, 02_beta"):
        profiles.select_notebooks(all_notebooks, ["07"])


def test_profile_notebooks_key_is_the_default_selection(project):
    write_profile(project, "only2", "notebooks: [\"02\"]\n01_alpha:\n  stamps_root: /path/to/stamps\n")
    # 01 is not selected, so its placeholder path is not checked; its names still are
    assert [run.notebook.stem for run in plan(project, "only2")] == ["02_beta"]
    with pytest.raises(ParameterError, match="'stamps_root'.*does not exist"):
        plan(project, "only2", notebooks=["01"])  # --notebooks wins over the profile
    write_profile(project, "bad", "notebooks: 02\n")
    with pytest.raises(ParameterError, match="'notebooks' must be a list"):
        plan(project, "bad")


# --------------------------------------------------------------------------- running
def output_text(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_runner_validates_everything_before_running_anything(project):
    write_profile(project, "p", "02_beta:\n  fail: maybe\n")
    with pytest.raises(ParameterError, match="'fail' of 02_beta.ipynb expects bool"):
        profiles.execute_plan(plan(project, "p"))
    assert not (project["runs"] / "p").exists()


def test_runner_executes_in_order_with_injected_parameters(project):
    write_profile(project, "p", "common:\n  seed: 5\n01_alpha:\n  batch_size: 16\n  device: cpu\n")
    profiles.execute_plan(plan(project, "p"))
    assert output_text(project["runs"] / "p" / "01_alpha.ipynb") == "p 5 16 0.1 cpu\n"
    # the `python3` kernel must run this interpreter (the venv), not whatever is on PATH
    assert output_text(project["runs"] / "p" / "02_beta.ipynb") == f"p 5 False\n{sys.prefix}\n"


def test_runner_stops_at_failing_notebook_and_names_executed_copy(project):
    write_notebook(project["notebooks"] / "03_gamma.ipynb", PARAMS_02, "print('ran')")
    write_profile(project, "p", "02_beta:\n  fail: true\n")
    with pytest.raises(profiles.NotebookExecutionError) as info:
        profiles.execute_plan(plan(project, "p", notebooks=["02", "03"]))
    assert "02_beta.ipynb failed" in str(info.value) and "asked to fail" in str(info.value)
    assert str(project["runs"] / "p" / "02_beta.ipynb") in str(info.value)
    assert not (project["runs"] / "p" / "03_gamma.ipynb").exists()
    assert not (project["runs"] / "p" / "01_alpha.ipynb").exists()  # not selected


# --------------------------------------------------------------------------- CLI
@pytest.fixture()
def cli_project(project, monkeypatch):
    monkeypatch.setattr(config, "NOTEBOOKS_DIR", project["notebooks"])
    monkeypatch.setattr(config, "PROFILES_DIR", project["profiles"])
    monkeypatch.setattr(config, "RUNS_DIR", project["runs"])
    write_profile(project, "demo", "description: tiny demo\ncommon:\n  seed: 3\n")
    write_profile(project, "typo", "01_alpha:\n  batch_sise: 3\n")
    return project


def test_cli_dry_run_and_profiles(cli_project, capsys):
    assert main(["run", "--dry-run", "--notebooks", "01", "--set", "batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "01_alpha.ipynb ->" in out and "batch_size = 2" in out and "seed = 3" in out
    assert "02_beta" not in out and "none executed" in out
    assert not cli_project["runs"].exists()
    assert main(["profiles"]) == 0
    assert "demo             tiny demo" in capsys.readouterr().out


def test_cli_rejects_bad_input_with_status_2(cli_project, capsys):
    assert main(["check-profile", "typo"]) == 2
    assert "unknown parameter 'batch_sise'" in capsys.readouterr().err
    assert main(["run", "--profile", "nope"]) == 2
    assert "Unknown profile 'nope'" in capsys.readouterr().err
    assert main(["check-profile", "demo"]) == 0


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "zsl_utils", "run", "--help"], capture_output=True, text=True, cwd=config.PROJ_ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "--profile" in result.stdout and "--dry-run" in result.stdout


# --------------------------------------------------------------------------- committed profiles
COMMITTED_PROFILES = ("demo", "imagenet_full", "food101_full")
EXPECTED_NOTEBOOKS = ("01_conse_construction", "02_imagenet_zero_shot_eval", "03_huse_food101")


def test_committed_profiles_exist_and_name_only_expected_sections():
    assert set(COMMITTED_PROFILES) <= set(profiles.available_profiles())
    for name in COMMITTED_PROFILES:
        profile = profiles.load_profile(name)
        assert profile.description, f"{name}.yaml needs a description"
        assert set(profile.sections) <= set(EXPECTED_NOTEBOOKS), f"{name}.yaml: unexpected sections"


@pytest.mark.parametrize("profile_name", COMMITTED_PROFILES)
@pytest.mark.parametrize("stem", EXPECTED_NOTEBOOKS)
def test_committed_profile_validates_against_committed_notebook(profile_name, stem):
    notebook = config.NOTEBOOKS_DIR / f"{stem}.ipynb"
    if not notebook.exists():
        pytest.skip(f"{notebook.name} is not committed yet")
    profile = profiles.load_profile(profile_name)
    # full profiles carry placeholder data paths; only the demo must run as is
    parameters = profiles.resolve_parameters(profile, notebook, check_paths=profile_name == "demo")
    assert parameters["profile_name"] == profile_name


def test_demo_profile_plans_every_notebook():
    present = [stem for stem in EXPECTED_NOTEBOOKS if (config.NOTEBOOKS_DIR / f"{stem}.ipynb").exists()]
    if len(present) < len(EXPECTED_NOTEBOOKS):
        pytest.skip(f"only {len(present)} of {len(EXPECTED_NOTEBOOKS)} notebooks committed so far")
    runs = profiles.plan_runs("demo")
    assert [run.notebook.stem for run in runs] == list(EXPECTED_NOTEBOOKS)


@pytest.mark.parametrize("profile_name", ["imagenet_full", "food101_full"])
def test_full_profile_placeholder_path_stops_before_running(profile_name):
    profile = profiles.load_profile(profile_name)
    missing = [s for s in EXPECTED_NOTEBOOKS if not (config.NOTEBOOKS_DIR / f"{s}.ipynb").exists()]
    if missing:
        pytest.skip(f"notebooks not committed yet: {missing}")
    with pytest.raises(ParameterError, match=r"/path/to/.*does not exist.*--set"):
        profiles.plan_runs(profile_name)


def test_full_imagenet_profile_names_the_devise_training_root(tmp_path):
    if not (config.NOTEBOOKS_DIR / "02_imagenet_zero_shot_eval.ipynb").exists():
        pytest.skip("notebook 02 not committed yet")
    with pytest.raises(ParameterError, match=r"'ilsvrc2012_train_root'.*/path/to/ilsvrc2012/train.*does not exist"):
        profiles.plan_runs("imagenet_full", overrides=[f"imagenet21k_root={tmp_path}"], runs_dir=tmp_path / "runs")
