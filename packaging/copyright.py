"""Writes the Debian copyright file (DEP-5) of the package: edge-agent, then every bundled wheel.

Usage: python copyright.py SITE_PACKAGES OUT

For each distribution installed in SITE_PACKAGES it takes the licence as its metadata declares it
(`License-Expression`, else `License`, else the classifiers) and appends the licence files the
wheel ships (`.dist-info/licenses/`, or LICENSE*/COPYING*/NOTICE* in `.dist-info/`), so that the
copyright of everything inside /opt/edge-agent travels with the package.
"""

from __future__ import annotations

import sys
from importlib.metadata import Distribution, distributions
from pathlib import Path

PREFIX = "opt/edge-agent/lib/python3.11/site-packages"
HEAD = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edge-agent
Comment: edge-agent bundles its Python dependencies in a virtualenv under /opt/edge-agent
 (their wheels from PyPI, unmodified). Each is listed below with the licence its metadata
 declares, followed by the licence files it ships. /usr/share/doc/edge-agent/sbom.cdx.json
 lists the same components (CycloneDX).

Files: *
Copyright: edge-agent contributors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
"""


APACHE_2_MARKS = ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE")
APACHE_2_REFERENCE = (
    "The Apache License, Version 2.0. On Debian systems, its full text is in\n"
    "/usr/share/common-licenses/Apache-2.0."
)


def licence_of(dist: Distribution) -> str:
    meta = dist.metadata
    for key in ("License-Expression", "License"):
        value = (meta.get(key) or "").strip()
        if value and "\n" not in value and len(value) < 80 and value.upper() != "UNKNOWN":
            return value
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::")]  # fmt: skip
    return " or ".join(classifiers) or "see the licence files below"


def licence_files(dist: Distribution) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for file in dist.files or []:
        parts = file.parts
        if not parts or not parts[0].endswith(".dist-info"):
            continue
        name = parts[-1].upper()
        in_licenses = len(parts) > 2 and parts[1] == "licenses"
        if in_licenses or name.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")):
            text = Path(str(file.locate())).read_text(encoding="utf-8", errors="replace")
            if all(mark in text for mark in APACHE_2_MARKS):
                text = APACHE_2_REFERENCE  # Debian ships the text once, for every package
            found.append(("/".join(parts[1:]), text))
    return found


def indent(text: str) -> str:
    """DEP-5 continuation lines: one space before each line, ` .` for an empty one."""
    return "\n".join(f" {line}" if line.strip() else " ." for line in text.rstrip().splitlines())


def main(site: Path, out: Path) -> None:
    blocks = [HEAD]
    for dist in sorted(distributions(path=[str(site)]), key=lambda d: d.metadata["Name"].lower()):
        name, version = dist.metadata["Name"], dist.version
        if name == "edge-agent":
            continue
        top = sorted({f.parts[0] for f in dist.files or [] if len(f.parts) > 1})
        files = " ".join(f"{PREFIX}/{t}/*" for t in top) or f"{PREFIX}/{name}*"
        licence = licence_of(dist)
        text = "\n\n".join(f"{path}:\n\n{body}" for path, body in licence_files(dist))
        blocks.append(
            f"Files: {files}\nCopyright: the {name} {version} authors (see below)\n"
            f"License: {licence}\n"
            + (indent(text) if text else f" {name} {version} ships no licence file; "
               "its metadata declares the licence above.")  # fmt: skip
            + "\n"
        )
    out.write_text("\n".join(blocks), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
