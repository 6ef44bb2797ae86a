"""Sphinx configuration of forgeqmp's docs: ``nox -s docs`` (warnings fail the build)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import forgeqmp  # noqa: E402 - after the path set-up; installed (editable) by the nox session

project = "forgeqmp"
author = "the forgeqmp authors"
copyright = "the forgeqmp authors"
release = forgeqmp.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinx.ext.graphviz",
    "forgeqmp_docs",  # docs/_ext: generated diagram and tables, tolerant toctree
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"show-inheritance": True}
autoclass_content = "class"

# The state diagram is Graphviz text generated from forgeqmp.core.states.TRANSITIONS and drawn into SVG
# at build time (Debian's graphviz): no script, no network. The same table is also a plain table.
graphviz_output_format = "svg"

html_theme = "furo"
html_title = f"forgeqmp {release}"
