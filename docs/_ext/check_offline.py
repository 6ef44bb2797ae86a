"""Check a built HTML tree (``nox -s docs`` runs it): every page renders without the network.

- No page loads a script, stylesheet or image from another host (the state diagram used to need
  mermaid.js from a CDN).
- The states page shows the state diagram as an SVG drawn at build time, naming every state.

Exit status 1 with the reasons when a check fails.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from forgeqmp.core.states import State

_REMOTE = re.compile(
    r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I
)
_SVG = re.compile(r"""(?:data|src)=["']([^"']+\.svg)["']""")


def problems(html: Path) -> list[str]:
    found: list[str] = []
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(errors="replace")
        for match in _REMOTE.finditer(text):
            found.append(f"{page.relative_to(html)}: loads from the network: {match.group(0)}")
    states = html / "states.html"
    if not states.exists():
        return [*found, "states.html is missing"]
    svgs = [states.parent / ref for ref in _SVG.findall(states.read_text())]
    drawn = [svg for svg in svgs if svg.exists() and "<svg" in svg.read_text()]
    if not drawn:
        found.append("states.html shows no state diagram drawn as SVG at build time")
    else:
        text = "".join(svg.read_text() for svg in drawn)
        missing = [s.value for s in State if f">{s.value}<" not in text]
        if missing:
            found.append(f"the state diagram lacks the states {', '.join(missing)}")
    return found


def main() -> int:
    html = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html")
    found = problems(html)
    for line in found:
        print(f"check_offline: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
