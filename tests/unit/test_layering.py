"""Layering: shared code (`wicore`) never imports a service, and a service never imports
another; each service runs from its own entry point, which the CLI names explicitly."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

from wicore.cli import SERVICES

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "shared" / "v1"  # the gRPC stubs import nothing of ours


def _package_dirs() -> dict[str, Path]:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setup["package-dir"].items()}


def _services() -> dict[str, Path]:
    """Service name -> folder: every package that lives under services/."""
    return {
        name.removeprefix("wicore."): folder
        for name, folder in _package_dirs().items()
        if folder.parent == ROOT / "services"
    }


def _module_name(path: Path, package: str, folder: Path) -> str:
    parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "wicore" and parts[1] in _services() else None


def _imports(path: Path, module: str) -> Iterator[tuple[int, str, str | None]]:
    """(line, what is imported, the service it belongs to or None) for each import in
    the file; a dynamic import of a name not known here counts as the service `?`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, f"import {alias.name}", _service_of(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from wicore import worker` imports a package; `from wicore.x import y` a name in x.
                service = _service_of(base) or _service_of(f"{base}.{alias.name}")
                yield node.lineno, f"from {'.' * node.level}{node.module or ''} import {alias.name}", service
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                literal = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                yield node.lineno, ast.unparse(node), "?" if literal is None else _service_of(literal)


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if GENERATED not in p.parents)


def test_shared_never_imports_a_service_and_a_service_no_other() -> None:
    services = _services()
    owners = [("wicore", ROOT / "shared", None), *((f"wicore.{n}", f, n) for n, f in services.items())]
    offences = []
    for package, folder, own in owners:
        for path in _sources(folder):
            module = _module_name(path, package, folder)
            for line, what, service in _imports(path, module):
                if service is not None and service != own:
                    where = "shared code" if own is None else f"the {own} service"
                    whom = "a module named at run time" if service == "?" else f"the {service} service"
                    offences.append(f"{path.relative_to(ROOT)}:{line}: {what}  ({where} imports {whom})")
    assert not offences, "layering broken:\n" + "\n".join(offences)


def test_the_cli_names_every_service_and_each_has_an_entry_point() -> None:
    services = _services()
    assert {name: f"wicore.{name}" for name in services} == SERVICES
    for folder in services.values():
        assert (folder / "__main__.py").is_file(), f"{folder} has no __main__.py"
