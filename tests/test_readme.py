"""The README's schema snippets are valid schemas, and its reference table of schema keys is the one
generated from the pydantic models (issue 11 section 5)."""

from __future__ import annotations

import re

import pytest
import yaml

from mtrec.schema import KEY_DOCS, Schema, schema_from_dict, schema_reference
from tests.conftest import REPO

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

    nested = {"SourceSpec": ".", "FormatSpec": ".", "SplitSpec": ".", "FeatureSpec": "[].", "TaskSpec": "[]."}

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
    for key in ("features[].column", "features[].separator", "format.null_values", "format.names",
                "tasks[].negative", "tasks[].strict", "source.valid", "name"):
        assert key in rows
