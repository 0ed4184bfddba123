"""constraints.txt, the tested versions `make setup` installs, must stay inside pyproject.toml's ranges: a pin outside
them would make pip refuse to install srlm at all on a fresh machine."""
from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    out = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt:{number}: {line!r} is not name==version"
        out[canonicalize_name(requirement.name)] = specs[0].version
    return out


def test_every_pin_is_inside_pyproject_ranges():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, dependencies)}
    pinned = pins()
    assert {"transformers", "trl", "accelerate"} <= set(pinned)
    for name, version in pinned.items():
        if name in ranges:
            assert ranges[name].contains(version, prereleases=True), \
                f"constraints.txt pins {name}=={version}, outside pyproject.toml's {name}{ranges[name]}"


def test_setup_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    assert any(line.startswith("$(STAMP):") and "constraints.txt" in line for line in makefile.splitlines()), \
        "the venv must be rebuilt when constraints.txt changes"
