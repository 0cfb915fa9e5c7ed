"""The package's docstrings and API reference: every public class shows a runnable example, no example is skipped,
every module is in docs/api.md, and nothing points to a file that is not in the repository. (pytest runs the examples
themselves: `--doctest-modules` in pyproject.toml.)"""

import ast
import re
from pathlib import Path

import pytest

import protopool_hf


ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted((ROOT / "protopool_hf").glob("*.py"))


def _public_classes(path: Path) -> list[ast.ClassDef]:
    tree = ast.parse(path.read_text())
    names = None
    for node in tree.body:
        targets = [getattr(target, "id", None) for target in getattr(node, "targets", [])]
        if "__all__" in targets and isinstance(node.value, ast.List | ast.Tuple):
            names = set(ast.literal_eval(node.value))
    return [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and (node.name in names if names is not None else node.name[0] != "_")
    ]


def test_every_public_class_has_a_runnable_example():
    missing = [
        f"{path.name}: {node.name}"
        for path in MODULES
        for node in _public_classes(path)
        if ">>>" not in (ast.get_docstring(node) or "")
    ]
    assert not missing, f"public classes without a `>>>` example in their docstring: {missing}"


def test_no_docstring_example_is_skipped():
    skipped = [
        f"{path.name}:{number}"
        for path in MODULES
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"doctest:.*\+SKIP", line)
    ]
    assert not skipped, f"docstring examples must run offline as written (tiny test_* backbones): {skipped}"


def test_every_module_is_in_the_api_reference():
    references = set(re.findall(r"^::: protopool_hf\.(\w+)", (ROOT / "docs" / "api.md").read_text(), re.MULTILINE))
    covered = {protopool_hf._EXPORTS.get(name, name) for name in references}  # a top-level name: its module
    missing = [path.stem for path in MODULES if path.stem != "__init__" and path.stem not in covered]
    assert not missing, f"add `::: protopool_hf.<module>` (or its public names) to docs/api.md for: {missing}"


# Files that live outside the repository (the project's design notes), which readers of a clone cannot open.
OUTSIDE = re.compile(r"DESIGN\.md|\bnotes/|notes §|protopool-reference|hf-ecosystem\.md|style-anchors\.md")


@pytest.mark.parametrize("folder", ["protopool_hf", "examples", "tests", "docs", "."])
def test_nothing_points_to_a_file_outside_the_repository(folder):
    paths = (ROOT / folder).glob("*.*") if folder == "." else (ROOT / folder).rglob("*")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in paths
        if path.suffix in {".py", ".md", ".toml", ".yml", ".sh", ".json"} and path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, f"cite the paper, the official code (gmum/ProtoPool @ 2bd4288) or docs/ instead: {offenders}"
