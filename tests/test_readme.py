"""The README's schema snippets are valid schemas, and its reference table of schema keys is the one
generated from the pydantic models (issue 11 section 5); its Python API examples run (issue 12 section 4)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mtrec.config import build_run_config
from mtrec.schema import KEY_DOCS, Schema, load_schema, schema_from_dict, schema_reference
from tests.conftest import REPO
from tests.helpers import write_toy

README = (REPO / "README.md").read_text()


def schema_snippets() -> list[str]:
    """Every ```yaml block of the README that looks like a schema (has features and tasks)."""
    blocks = re.findall(r"```ya?ml\n(.*?)```", README, flags=re.S)
    return [b for b in blocks if re.search(r"^features:", b, re.M) and re.search(r"^tasks:", b, re.M)]


def test_the_readme_has_schema_snippets() -> None:
    assert schema_snippets()


@pytest.mark.parametrize("index", range(len(schema_snippets())))
def test_readme_schema_snippet_is_valid(index: int) -> None:
    text = schema_snippets()[index]
    schema = schema_from_dict(yaml.safe_load(text), f"README.md schema snippet {index + 1}")
    # the snippet shows what it claims: a shared vocabulary, a task space, a per-task sample weight column
    names = {f.name for f in schema.features}
    assert all(f.vocab in names for f in schema.features if f.vocab)
    assert all(t.space in schema.task_names for t in schema.tasks if t.space)


def test_readme_reference_table_is_generated() -> None:
    start, end = "<!-- schema-reference:start -->\n", "<!-- schema-reference:end -->"
    assert start in README and end in README
    table = README.split(start, 1)[1].split(end, 1)[0]
    assert table == schema_reference(), "regenerate it: python -m mtrec.schema"


def test_reference_table_covers_every_key() -> None:
    """Every field of the schema models (nested ones by their dotted path) has a row, and no row is stale."""
    expected = set()

    import mtrec.schema as module

    nested = {
        "SourceSpec": ".",
        "FormatSpec": ".",
        "SplitSpec": ".",
        "FeatureSpec": "[].",
        "TaskSpec": "[].",
        "JoinSpec": "[].",
        "LabelSpec": ".",
    }

    def walk(model: type, prefix: str) -> None:
        for name, info in model.model_fields.items():
            if info.exclude:
                continue
            expected.add(prefix + name)
            for sub, sep in nested.items():
                if sub in str(info.annotation):
                    walk(getattr(module, sub), prefix + name + sep)

    walk(Schema, "")
    rows = {line.split("`")[1] for line in schema_reference().splitlines()[2:]}
    assert rows == expected == set(KEY_DOCS)
    for key in (
        "features[].column",
        "features[].separator",
        "format.null_values",
        "format.names",
        "tasks[].negative",
        "tasks[].strict",
        "source.valid",
        "name",
    ):
        assert key in rows


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def test_readme_python_api_and_run_config_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    """The "Run configs and the Python API" section's blocks run as written, in a folder holding the
    data files they name (a small generated CSV as data/schema.yaml, its rows again as data/new.csv)."""
    section = _section("Run configs and the Python API")
    python_blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    yaml_blocks = re.findall(r"```ya?ml\n(.*?)```", section, flags=re.S)
    assert len(python_blocks) == 1 and len(yaml_blocks) == 1
    schema_path = write_toy(tmp_path / "data", rows=300)
    shutil.copy(tmp_path / "data" / "toy.csv", tmp_path / "data" / "new.csv")
    monkeypatch.chdir(tmp_path)

    # the run config file is valid, and names what it shows
    (tmp_path / "run.yaml").write_text(yaml_blocks[0])
    config = build_run_config(tmp_path / "run.yaml", {})
    assert (config.model, config.epochs, config.model_args["num_experts"]) == ("mmoe", 2, 2)
    assert config.resolve_schema().task_names == load_schema(schema_path).task_names

    namespace: dict = {}
    exec(compile(python_blocks[0], "README.md python block", "exec"), namespace)
    run = tmp_path / "runs" / "mmoe"
    assert json.loads((run / "metrics.json").read_text())["test"] == namespace["result"].metrics["test"]
    assert set(namespace["metrics"]["valid"]) == {"click", "watch"}
    scores = (tmp_path / "scores.csv").read_text().splitlines()
    assert namespace["rows"] == 300 and len(scores) == 301 and scores[0].startswith("click,watch")
