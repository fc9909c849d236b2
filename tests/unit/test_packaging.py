"""Every package folder is listed in pyproject.toml, and the stubs are fresh."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed() -> None:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir: dict[str, str] = setup["package-dir"]
    listed = set(setup["packages"])
    folders = {(ROOT / d).resolve(): name for name, d in package_dir.items()}
    found = set()
    for init in [*ROOT.glob("shared/**/__init__.py"), *ROOT.glob("services/**/__init__.py")]:
        folder = init.parent.resolve()
        # Map the folder to its import name through the nearest package-dir entry.
        for base, name in sorted(folders.items(), key=lambda kv: -len(str(kv[0]))):
            if folder == base or base in folder.parents:
                rel = folder.relative_to(base).parts
                found.add(".".join([name, *rel]))
                break
        else:
            raise AssertionError(f"{folder} is under no package-dir entry")
    # Folders without Python listed for their data files alone (the worker's C sources).
    found |= {name for name in setup.get("package-data", {}) if name in listed and name not in found}
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"
    assert not any(name.split(".")[0] in ("shared", "services") for name in listed)


def test_generated_stubs_match_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
