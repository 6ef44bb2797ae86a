"""The docs' offline check (run by ``nox -s docs`` after the build) finds what it must."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from forgeqmp.core.states import State

_SPEC = importlib.util.spec_from_file_location(
    "check_offline", Path(__file__).resolve().parents[2] / "docs" / "_ext" / "check_offline.py"
)
assert _SPEC is not None
assert _SPEC.loader is not None
check_offline = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check_offline)


def _tree(tmp_path: Path, states_page: str, svg: str | None) -> Path:
    (tmp_path / "index.html").write_text('<script src="_static/local.js"></script>')
    (tmp_path / "states.html").write_text(states_page)
    if svg is not None:
        (tmp_path / "_images").mkdir()
        (tmp_path / "_images" / "diagram.svg").write_text(svg)
    return tmp_path


GOOD_SVG = "<svg>" + "".join(f"<text>{s.value}</text>" for s in State) + "</svg>"
OBJECT = '<object data="_images/diagram.svg" type="image/svg+xml"></object>'


def test_a_tree_with_a_drawn_diagram_and_local_assets_passes(tmp_path: Path) -> None:
    assert check_offline.problems(_tree(tmp_path, OBJECT, GOOD_SVG)) == []


@pytest.mark.parametrize(
    "tag",
    [
        '<script src="https://cdn.example.invalid/mermaid.min.js"></script>',
        "<link rel=stylesheet href='//fonts.example.invalid/a.css'>",
    ],
)
def test_a_page_loading_from_the_network_fails(tmp_path: Path, tag: str) -> None:
    found = check_offline.problems(_tree(tmp_path, OBJECT + tag, GOOD_SVG))
    assert len(found) == 1
    assert "loads from the network" in found[0]


def test_a_diagram_left_to_the_browser_fails(tmp_path: Path) -> None:
    page = '<pre class="mermaid">stateDiagram-v2</pre>'
    assert check_offline.problems(_tree(tmp_path, page, None)) == [
        "states.html shows no state diagram drawn as SVG at build time"
    ]


def test_a_diagram_missing_a_state_fails(tmp_path: Path) -> None:
    svg = GOOD_SVG.replace(f"<text>{State.FAILED.value}</text>", "")
    assert check_offline.problems(_tree(tmp_path, OBJECT, svg)) == [
        f"the state diagram lacks the states {State.FAILED.value}"
    ]
