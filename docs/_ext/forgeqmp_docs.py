"""Sphinx extension for forgeqmp's docs: pages generated from the code, and a toctree that
tolerates pages not written yet.

Directives (usable from MyST Markdown pages as ```` ```{name} ```` fences):

- ``forgeqmp-state-diagram``: the state diagram of :data:`forgeqmp.core.states.TRANSITIONS`, written
  by :func:`forgeqmp.core.states.render_dot` and drawn into SVG by Graphviz at build time (never drawn
  by hand; the page needs no script and no network). The flag ``:operations:`` leaves out the
  ``recovered_*`` events of ``recover``.
- ``forgeqmp-transition-table``: the same table as a plain table (readable without JavaScript).
- ``forgeqmp-qemu-support``: what the feature probe finds in the introspection recorded from real
  QEMU builds (``tests/data/qemu-*.json.gz``), and the strategy/transport each build gets.
- ``forgeqmp-optional-toctree``: a toctree whose entries that do not exist (yet) are dropped
  instead of failing the build; ``:others:`` appends every other page of the docs.
- ``forgeqmp-optional-automodule``: ``automodule`` with ``:members:`` for a module, only if it
  imports (for modules other engineers are writing).
- ``forgeqmp-cli-reference``: the CLI reference generated from its argparse parser.
- ``forgeqmp-when``: its content only if ``module:NAME`` imports, ``doc:NAME`` exists or
  ``cli:NAME`` is a CLI command (with ``:absent:``, only if not), so pages describe what this
  build really has.

Role ``optdoc``: a link to a page if it exists, else just its title text.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.directives.other import TocTree
from sphinx.ext.graphviz import graphviz
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.matching import Matcher
from sphinx.util.nodes import split_explicit_title

from forgeqmp.core import features, states
from forgeqmp.core.features import Features, features_from_introspection
from forgeqmp.core.plans import enable as plans_enable
from forgeqmp.core.plans.enable import Strategy, choose_strategy
from forgeqmp.core.states import RECOVER_EVENTS, TRANSITIONS, render_dot
from forgeqmp.errors import FeatureMissing

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "tests" / "data"


# --- generated content ---------------------------------------------------------------------------


def _table(
    header: Sequence[str], rows: Iterable[Sequence[str]], widths: Sequence[int]
) -> nodes.table:
    """A docutils table with a header row; in cells, text between backquotes becomes code."""

    def cell(text: str) -> nodes.entry:
        entry = nodes.entry()
        para = nodes.paragraph()
        for i, part in enumerate(text.split("`")):
            if part:
                para += nodes.literal(text=part) if i % 2 else nodes.Text(part)
        entry += para
        return entry

    table = nodes.table()
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for title in header:
        row += cell(title)
    head += row
    body = nodes.tbody()
    group += body
    for values in rows:
        row = nodes.row()
        for value in values:
            row += cell(value)
        body += row
    return table


class StateDiagram(SphinxDirective):
    """The state diagram, generated from the transition table when the docs are built."""

    option_spec: ClassVar[dict[str, Any]] = {"operations": directives.flag}

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(states.__file__)
        table = TRANSITIONS
        if "operations" in self.options:
            table = {k: v for k, v in TRANSITIONS.items() if k[1] not in RECOVER_EVENTS}
        node = graphviz()
        node["code"] = render_dot(table)
        node["options"] = {"docname": self.env.docname}
        node["alt"] = "forgeqmp session states and the events between them"
        return [node]


class TransitionTable(SphinxDirective):
    """Every entry of :data:`forgeqmp.core.states.TRANSITIONS`, in table order."""

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(states.__file__)
        rows = [
            (
                "(no session)" if source is None else f"`{source.value}`",
                f"`{event.value}`",
                f"`{target.value}`",
            )
            for (source, event), target in TRANSITIONS.items()
        ]
        return [_table(("from", "event", "to"), rows, (1, 1, 1))]


def recorded_features() -> list[Features]:
    """The features of every QEMU build whose introspection is recorded in tests/data."""
    found = []
    for path in sorted(RECORDED.glob("qemu-*.json.gz")):
        if path.name.endswith("-blockinfo.json.gz"):
            continue
        with gzip.open(path, "rt") as f:
            data = json.load(f)
        found.append(
            features_from_introspection(
                data["version"], data["schema"], data["migrate_capabilities"]
            )
        )
    return sorted(found, key=lambda f: (f.version.major, f.version.minor), reverse=True)


class QemuSupport(SphinxDirective):
    """Per recorded QEMU build: the probed features and the strategy/transport choices."""

    def run(self) -> list[nodes.Node]:
        for source in (features.__file__, plans_enable.__file__, *RECORDED.glob("qemu-*.json.gz")):
            self.env.note_dependency(str(source))
        builds = recorded_features()
        header = ["", *(f"QEMU {b.version.major}.{b.version.minor}" for b in builds)]
        flags = [k for k in builds[0].as_dict() if k != "version"]
        rows: list[list[str]] = [["version probed", *(f"`{b.version}`" for b in builds)]]
        for flag in flags:
            rows.append([f"`{flag}`", *("yes" if b.as_dict()[flag] else "no" for b in builds)])
        for strategy in Strategy:
            line = [f"strategy `{strategy.value}`"]
            for build in builds:
                try:
                    _, transport = choose_strategy(build, strategy)
                except FeatureMissing:
                    line.append("refused (FeatureMissing)")
                else:
                    line.append(f"yes, transport `{transport.value}`")
            rows.append(line)
        return [_table(header, rows, (2, *(3 for _ in builds)))]


# --- tolerance of pages and modules that may not exist yet -------------------------------------


class OptionalTocTree(TocTree):
    """A toctree that drops entries naming pages that do not exist, and with ``:others:``
    appends every page not listed (so a page added later never breaks the build)."""

    option_spec: ClassVar[dict[str, Any]] = {**TocTree.option_spec, "others": directives.flag}

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()  # which pages exist may change between builds
        found = self.env.found_docs
        current = self.env.docname
        kept: list[str] = []
        listed: set[str] = {current}
        for line in self.content:
            entry = line.strip()
            if not entry:
                continue
            _, _, target = split_explicit_title(entry)
            if target in found:
                kept.append(line)
                listed.add(target)
            else:
                logger.info("forgeqmp docs: page %r not present; left out of the toctree", target)
        if "others" in self.options:
            excluded = Matcher(self.config.exclude_patterns)
            for docname in sorted(found - listed):
                if not excluded(str(self.env.doc2path(docname, False))):
                    kept.append(docname)
        self.content = StringList(kept, source=self.content.source(0) if self.content else "")
        return super().run()


class OptionalAutomodule(SphinxDirective):
    """``automodule`` with ``:members:`` if the module imports, under a rubric ``:title:``;
    nothing otherwise. For MyST pages (the content is an ``eval-rst`` block)."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {"title": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()  # the module may appear between builds
        name = self.arguments[0]
        try:
            importlib.import_module(name)
        except Exception as exc:  # a module being written: leave it out, do not fail the docs
            logger.info("forgeqmp docs: %s not documented (%s: %s)", name, type(exc).__name__, exc)
            return []
        container = nodes.container()
        rst = ["```{eval-rst}", f".. automodule:: {name}", "   :members:", "```"]
        block = StringList(rst, source=name)
        self.state.nested_parse(block, self.content_offset, container)
        title = self.options.get("title")
        heading: list[nodes.Node] = [nodes.rubric(text=title)] if title else []
        return [*heading, *container.children]


def cli_commands() -> frozenset[str]:
    """The commands the ``forgeqmp`` CLI of this build has."""
    from forgeqmp.cli import build_parser

    found: set[str] = set()
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return frozenset(found)


class CliReference(SphinxDirective):
    """The CLI's reference, from its argparse parser: the global options, then each command with
    its usage and every option with its help text (which states its default). Generated, so it
    cannot drift from ``forgeqmp --help``."""

    def run(self) -> list[nodes.Node]:
        from forgeqmp import cli

        self.env.note_dependency(cli.__file__)
        parser = cli.build_parser()
        out: list[nodes.Node] = [nodes.literal_block(text=parser.format_usage().strip())]
        out.append(self._options("Global options", parser))
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                continue
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                section = nodes.section(ids=[f"cli-{name}"])
                section += nodes.title(text=f"forgeqmp {name}")
                section += nodes.paragraph(text=sub.description or helps.get(name, ""))
                section += nodes.literal_block(text=sub.format_usage().strip())
                section += self._options("Options", sub)
                out.append(section)
        return out

    @staticmethod
    def _options(title: str, parser: argparse.ArgumentParser) -> nodes.Node:
        rows = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            names = ", ".join(action.option_strings) or (action.metavar or action.dest)
            if action.option_strings and action.nargs != 0:
                names += f" {action.metavar or action.dest.upper()}"
            text = action.help or ""
            if action.choices and not isinstance(action.choices, dict):
                text += f" (one of: {', '.join(map(str, action.choices))})"
            rows.append((f"`{names}`", text.replace("`", "'")))
        container = nodes.container()
        container += nodes.rubric(text=title)
        container += _table(("option", "meaning"), rows, (1, 3))
        return container


class When(SphinxDirective):
    """Content shown only if ``module:NAME`` imports, ``doc:NAME`` exists or ``cli:NAME`` is a
    command of the CLI (``:absent:``: only if not), so a page says what this build really has."""

    required_arguments = 1
    has_content = True
    option_spec: ClassVar[dict[str, Any]] = {"absent": directives.flag}

    def present(self, what: str) -> bool:
        kind, _, name = what.partition(":")
        if kind == "module":
            try:
                importlib.import_module(name)
            except Exception:
                return False
            return True
        if kind == "doc":
            return name in self.env.found_docs
        if kind == "cli":
            return name in cli_commands()
        raise self.error(f"forgeqmp-when: expected module:, doc: or cli:NAME, not {what!r}")

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()  # what is present may change between builds
        if self.present(self.arguments[0]) == ("absent" in self.options):
            return []
        container = nodes.container()
        self.state.nested_parse(self.content, self.content_offset, container)
        return list(container.children)


def optdoc_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: Any,
    options: dict[str, Any] | None = None,
    content: Sequence[str] = (),
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    """``{optdoc}`title <page>```: a :doc: link when the page exists, else the plain title."""
    env = inliner.document.settings.env
    env.note_reread()  # the page may appear between builds
    has_title, title, target = split_explicit_title(text)
    if target in env.found_docs:
        doc_role = env.get_domain("std").role("doc")
        return doc_role("doc", rawtext, text, lineno, inliner, options or {}, list(content))
    return [nodes.inline(rawtext, title if has_title else target)], []


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("forgeqmp-state-diagram", StateDiagram)
    app.add_directive("forgeqmp-transition-table", TransitionTable)
    app.add_directive("forgeqmp-qemu-support", QemuSupport)
    app.add_directive("forgeqmp-optional-toctree", OptionalTocTree)
    app.add_directive("forgeqmp-optional-automodule", OptionalAutomodule)
    app.add_directive("forgeqmp-when", When)
    app.add_directive("forgeqmp-cli-reference", CliReference)
    app.add_role("optdoc", optdoc_role)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
