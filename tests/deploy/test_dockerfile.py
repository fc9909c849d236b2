"""deploy/docker/Dockerfile, read with Docker's own parser (the `dockerfile` package), and the
Makefile target it runs.

No Docker daemon is needed: each test checks one property that would hurt if it slipped.
Pinned bases (a rebuild gets the same base), two stages and no compilers in the final one
(size and attack surface), a numeric non-root user set after the last root step (Kubernetes'
runAsNonRoot), an exec-form `wicore` entrypoint (signals reach the service) and no
HEALTHCHECK (probes do that), the state and cache directories named by the config's real
environment variables, and the install: the image runs the Makefile's own `install` target,
so its packages cannot drift from `make up`'s. `make -n` (a dry run) shows what it runs.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import dockerfile
import pytest

from wicore.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
DOCKERIGNORE = ROOT / ".dockerignore"

COMPILERS = {"gcc", "g++", "cc", "c++", "clang", "build-essential", "make", "cmake"}
PACKAGE_MANAGERS = {"apt-get", "apt", "apk", "yum", "dnf", "microdnf"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def commands() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(DOCKERFILE))


def global_args(cmds: tuple[dockerfile.Command, ...]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the only ones a FROM line can use)."""
    args: dict[str, str] = {}
    for cmd in cmds:
        if cmd.cmd == "FROM":
            break
        if cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            args[name] = default
    return args


def stages(cmds: tuple[dockerfile.Command, ...]) -> list[list[dockerfile.Command]]:
    """The build stages, each starting with its FROM."""
    result: list[list[dockerfile.Command]] = []
    for cmd in cmds:
        if cmd.cmd == "FROM":
            result.append([cmd])
        elif result:
            result[-1].append(cmd)
    return result


def stage_name(stage: list[dockerfile.Command]) -> str | None:
    value = stage[0].value
    return value[2] if len(value) == 3 and value[1].upper() == "AS" else None


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def stage_args(stage: list[dockerfile.Command]) -> dict[str, str]:
    args: dict[str, str] = {}
    for cmd in stage:
        if cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            args[name] = default
    return args


def env(stage: list[dockerfile.Command]) -> dict[str, str]:
    """ENV settings of a stage (the parser gives each one as a name, value pair)."""
    result: dict[str, str] = {}
    for cmd in stage:
        if cmd.cmd == "ENV":
            pairs = cmd.value
            result.update(zip(pairs[0::2], pairs[1::2], strict=True))
    return result


def base_problem(ref: str) -> str | None:
    """Why an image reference is not pinned, or None: a digest, or a version tag like 3.11.14."""
    if "$" in ref:
        return f"{ref}: an ARG without a default"
    if re.search(r"@sha256:[0-9a-f]{64}$", ref):
        return None
    name = ref.rsplit("/", 1)[-1]
    tag = name.partition(":")[2]
    if not tag:
        return f"{ref}: no tag (means latest)"
    if tag == "latest" or not re.search(r"\d+\.\d+\.\d+", tag):
        return f"{ref}: tag {tag!r} is not an exact version"
    return None


def installed_packages(run: str) -> set[str]:
    """Packages a RUN line installs with a system package manager."""
    found: set[str] = set()
    for part in re.split(r"&&|;|\|\|", run):
        words = shlex.split(part)
        if words and words[0] in PACKAGE_MANAGERS and ("install" in words or "add" in words):
            found |= {w for w in words[1:] if not w.startswith("-")} - {"install", "add"}
    return found


def make_install_argv(cmds: tuple[dockerfile.Command, ...]) -> list[str]:
    """The Dockerfile's `make install ...` command, with its ARG defaults filled in."""
    builder = stages(cmds)[0]
    runs = [c.value[0] for c in builder if c.cmd == "RUN" and re.search(r"\bmake\s+install\b", c.value[0])]
    assert len(runs) == 1, f"expected one RUN with `make install` in the builder stage, got {runs}"
    argv = shlex.split(substitute(runs[0], stage_args(builder)))
    return argv[argv.index("make") :]


# Make reads these from the environment too (`?=`, or an outer make's flags): not here.
MAKE_ENV_NAMES = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV", "PYTHON"}
MAKE_ENV_NAMES |= {"EXTRAS", "EDITABLE", "TORCH_INDEX_URL"}


def dry_run(make_args: list[str]) -> str:
    """What `make install` would run (-n: print only; -B: as if nothing were installed)."""
    done = subprocess.run(
        ["make", "-n", "-B", *make_args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in MAKE_ENV_NAMES},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout


def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.fullmatch(r"torch==[\w.+]+", d.replace(" ", ""))]
    assert len(pins) == 1, f"pyproject.toml should pin torch exactly once: {pins}"
    return pins[0].replace(" ", "")


def test_every_base_image_is_pinned() -> None:
    cmds = commands()
    args = global_args(cmds)
    names: set[str] = set()
    froms = [stage[0] for stage in stages(cmds)]
    assert froms, "no FROM"
    for cmd in froms:
        ref = substitute(cmd.value[0], args)
        if ref not in names:  # FROM an earlier stage is not a base image
            assert base_problem(ref) is None, base_problem(ref)
        if len(cmd.value) == 3:
            names.add(cmd.value[2])


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("python:3.11.14-slim-bookworm", True),
        ("nvidia/cuda:12.8.1-runtime-ubuntu24.04", True),
        ("python@sha256:" + "a" * 64, True),
        ("python:3.11", False),
        ("python:latest", False),
        ("python", False),
        ("python:slim", False),
        ("${PYTHON_IMAGE}", False),
        ("localhost:5000/python", False),
    ],
)
def test_the_pin_check_itself(ref: str, pinned: bool) -> None:
    assert (base_problem(ref) is None) == pinned


def test_final_stage_copies_the_venv_from_the_builder() -> None:
    all_stages = stages(commands())
    assert len(all_stages) >= 2, "expected a builder stage and a final stage"
    builders = {stage_name(s) for s in all_stages[:-1]} - {None}
    copies_from = [
        flag.partition("=")[2]
        for cmd in all_stages[-1]
        if cmd.cmd == "COPY"
        for flag in cmd.flags
        if flag.startswith("--from=")
    ]
    assert set(copies_from) & builders, f"the final stage copies from {copies_from}, not from {builders}"


def test_both_stages_use_the_same_base() -> None:
    # The venv's python is a link to the base's interpreter: it must be there in the final stage.
    cmds = commands()
    args = global_args(cmds)
    bases = {substitute(stage[0].value[0], args) for stage in stages(cmds)}
    assert len(bases) == 1, bases


def test_final_stage_runs_as_a_numeric_non_root_user_after_the_last_run() -> None:
    final = stages(commands())[-1]
    users = [i for i, cmd in enumerate(final) if cmd.cmd == "USER"]
    runs = [i for i, cmd in enumerate(final) if cmd.cmd == "RUN"]
    assert users, "the final stage sets no USER (runs as root)"
    user, _, group = final[users[-1]].value[0].partition(":")
    assert user.isdigit() and int(user) != 0, f"USER {user!r}: expected a numeric non-root uid"
    assert not group or (group.isdigit() and int(group) != 0), f"group {group!r}"
    assert not runs or users[-1] > runs[-1], "a RUN comes after the last USER"


def test_entrypoint_is_exec_form_wicore_with_a_default_cmd() -> None:
    final = stages(commands())[-1]
    entrypoints = [c for c in final if c.cmd == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert entrypoints[-1].json, "ENTRYPOINT must be exec form (JSON), or signals stop at a shell"
    assert entrypoints[-1].value == ("wicore",)
    cmd = [c for c in final if c.cmd == "CMD"]
    assert cmd and cmd[-1].json, "expected an exec-form CMD"
    assert cmd[-1].value[0] != "up", "`wicore up` runs every service in one container"


def test_no_healthcheck() -> None:
    assert [c.original for c in commands() if c.cmd == "HEALTHCHECK"] == []


def test_no_build_tools_in_the_final_stage() -> None:
    final = stages(commands())[-1]
    for cmd in final:
        if cmd.cmd == "RUN":
            assert not installed_packages(cmd.value[0]) & COMPILERS, cmd.original


def test_the_build_tools_check_itself() -> None:
    run = "apt-get update && apt-get install -y --no-install-recommends build-essential make"
    assert installed_packages(run) & COMPILERS == {"build-essential", "make"}
    assert installed_packages("apk add --no-cache gcc") == {"gcc"}
    assert installed_packages("useradd --uid 10001 wicore && mkdir -p /x") == set()


def test_install_is_the_makefiles_install_target() -> None:
    cmds = commands()
    argv = make_install_argv(cmds)
    assert argv[:2] == ["make", "install"], argv
    for cmd in cmds:
        if cmd.cmd == "RUN":
            assert not re.search(r"\bpip3?\s+install\b|-m\s+pip\b", cmd.value[0]), (
                f"the Dockerfile installs packages itself, beside the Makefile: {cmd.original}"
            )


def test_makefile_install_pins_the_same_torch_as_pyproject() -> None:
    pin = torch_pin()
    recipe = dry_run(["install", "VENV=/nonexistent/venv"])
    torch_lines = [line for line in recipe.splitlines() if re.search(r"pip install .*\btorch==", line)]
    assert len(torch_lines) == 1, recipe
    assert re.search(rf"(?<![\w.=]){re.escape(pin)}(?![\w.+])", torch_lines[0]), (pin, torch_lines[0])


def test_makefile_defaults_are_the_readmes_dev_install() -> None:
    # `make up` (the README's command) goes through `install`: editable, with the dev extras.
    assert re.search(r"(?m)^up:.*\binstall\b", MAKEFILE.read_text())
    recipe = dry_run(["install", "VENV=/nonexistent/venv"])
    assert 'pip install -q -e ".[dev]"' in recipe, recipe
    assert "--index-url" not in recipe, recipe


def test_image_install_is_non_editable_without_extras_from_the_build_args_index() -> None:
    cmds = commands()
    argv = make_install_argv(cmds)
    venv = next(a.partition("=")[2] for a in argv if a.startswith("VENV="))
    recipe = dry_run(argv[1:])
    lines = recipe.splitlines()
    assert f"test -x {venv}/bin/python || python3 -m venv {venv}" in lines, recipe
    assert f"{venv}/bin/pip install -q --index-url {CPU_INDEX} {torch_pin()}" in lines, recipe
    assert re.search(rf'(?m)^{re.escape(venv)}/bin/pip install -q +"\."$', recipe), recipe
    assert "[dev]" not in recipe and " -e " not in recipe, recipe
    assert f"touch {venv}/.wicore-installed" in lines, recipe
    # The final stage copies that venv and runs from it.
    final = stages(cmds)[-1]
    assert any(c.cmd == "COPY" and c.value[0] == venv for c in final), f"{venv} not copied"
    assert env(final)["PATH"].startswith(f"{venv}/bin:"), env(final)["PATH"]


def test_build_args_and_their_defaults() -> None:
    builder = stages(commands())[0]
    args = stage_args(builder)
    assert args.get("TORCH_INDEX_URL") == CPU_INDEX
    assert args.get("BAKE_MODEL") == "0"


def test_baked_model_lands_where_the_config_looks() -> None:
    cmds = commands()
    final_env = env(stages(cmds)[-1])
    cache = final_env["WICORE_CACHE_DIR"]
    state = final_env["WICORE_STATE_DIR"]
    # The names are the config's real ones: load_config maps them onto cache_dir and state_dir.
    config = load_config(None, {"WICORE_CACHE_DIR": cache, "WICORE_STATE_DIR": state})
    assert (config.cache_dir, config.state_dir) == (cache, state)
    bake = [c for c in stages(cmds)[0] if c.cmd == "RUN" and "ensure_smollm2" in c.value[0]]
    assert len(bake) == 1, "expected one RUN that converts SmolLM2 (BAKE_MODEL=1)"
    assert "BAKE_MODEL" in bake[0].value[0]
    assert f"ensure_smollm2(Path('{cache}'))" in bake[0].value[0], bake[0].original
    final = stages(cmds)[-1]
    copied = [c for c in final if c.cmd == "COPY" and c.value[0] == cache]
    assert copied and "--chown=10001:10001" in copied[0].flags, "the cache must be the service's"


def test_python_runtime_settings() -> None:
    final_env = env(stages(commands())[-1])
    assert final_env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert final_env.get("PYTHONUNBUFFERED") == "1"
    assert final_env.get("HOME", "/root") != "/root"


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, near enough: the last matching pattern wins, `!` re-includes, and a
    pattern that matches a directory excludes what is under it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            result = not keep
    return result


def test_dockerignore_excludes_the_venv_and_git() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".venv/bin/python", ".git", ".git/HEAD"):
        assert ignored(path, patterns), f"{path} is in the build context"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = dockerignore_patterns()
    sources = [
        src
        for cmd in commands()
        if cmd.cmd in ("COPY", "ADD") and not any(f.startswith("--from=") for f in cmd.flags)
        for src in cmd.value[:-1]
    ]
    assert sources, "the Dockerfile copies nothing from the context"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
