"""images/Dockerfile, checked without docker: what it copies against what the package ships, its pins
against the package's, and its Python install steps run here, in order, in fresh venvs.

The install test reads the Dockerfile's instructions (ARG, ENV, WORKDIR, COPY, RUN, CMD) and runs every
RUN step that calls pip or python, word for word, with only these changes, each one unavoidable here:

- every absolute path lies under a temporary directory per stage (`/opt/meetara` is `STAGE/opt/meetara`);
- `CMAKE_ARGS` is the README's CPU one instead of the CUDA one (no nvcc here, no GPU to run it);
- `--no-cache-dir` and `PIP_NO_CACHE_DIR` are dropped: they only change where pip finds files, not
  what it installs, and pip's wheel cache is what keeps this test to about a minute. The README's
  test command installs the package first, so its pip cache already holds the llama-cpp-python wheel
  that install built; a fresh venv reuses it only if the image pins the same version, and that is
  checked first, as a failure (otherwise llama.cpp compiles here for about 5 minutes).
- pip does not byte-compile what it installs (`PIP_COMPILE=0`): `.pyc` files are a cache, and writing
  them for torch and transformers took half of this test's CPU time (the smoke import compiles the
  modules it imports);
- `torch==X` takes the local CPU wheel where the image gets PyPI's CUDA one: same version, other build.

Everything else is skipped, by name (apt, the llama.cpp tools' git/cmake build, file shuffling outside
the venvs); a step of any other kind fails the test until this file says what to do with it. So the
image's CUDA builds (llama.cpp's tools, the binding's kernels) and its apt layers are not checked here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from setuptools import find_namespace_packages, find_packages

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Files that state the same pins for other installs (dev and CI, the task's setup without the image)
PIN_SOURCES = ["README.md", "pyproject.toml", "tasks/train.yaml"]

# RUN steps that run here (pip, python) and steps skipped by name (system packages, the llama.cpp
# tools' CUDA build, files outside the venvs); anything else fails until it is classified.
PYTHON_STEP = re.compile(r"pip|python(3(\.\d+)?)?")
SYSTEM_STEPS = {"apt-get", "add-apt-repository", "ldconfig", "git", "cmake"}  # system, llama.cpp's tools
SYSTEM_STEPS |= {"rm", "mkdir", "cp", "find", "ln", "echo"}  # files outside the venvs
CACHE_OFF = {"PIP_NO_CACHE_DIR"}
ASSIGN = r"\w+=(?:\"[^\"]*\"|'[^']*'|\S*)"


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def _stages() -> tuple[dict[str, str], list[Stage]]:
    """The ARGs declared before the first FROM, and the stages in order."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = rest.split()
            stages.append(
                Stage(words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages)))
            )
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            global_args.update(_assignments(rest))
    return global_args, stages


def _assignments(rest: str) -> dict[str, str]:
    return dict(word.partition("=")[::2] for word in shlex.split(rest))


def _steps(run: str) -> list[str]:
    # the Dockerfile chains steps with `&&` and quotes none; a quoted `&&` would show up as a broken step
    return [step.strip() for step in re.split(r"\s&&\s", run)]


def _command(step: str) -> str:
    """The program a shell step runs, past leading VAR=value assignments."""
    return os.path.basename(re.match(rf"(?:{ASSIGN}\s+)*(\S+)", step)[1])


def _expand(text: str, scope: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m[1] or m[2], m[0]), text)


def _python_steps() -> list[str]:
    """Every pip/python RUN step of every stage, with the stage's ARGs expanded."""
    steps = []
    for stage in _stages()[1]:
        args: dict[str, str] = {}
        for keyword, rest in stage.instructions:
            if keyword == "ARG":
                args.update(_assignments(rest))
            elif keyword == "RUN":
                steps += [_expand(s, args) for s in _steps(rest) if PYTHON_STEP.fullmatch(_command(s))]
    return steps


def _image_pins() -> dict[str, str]:
    """{canonical name: version} for every `name==version` the image's pip steps install."""
    pins = {}
    for step in _python_steps():
        for name, version in re.findall(r"(?<![\w.-])([A-Za-z][\w.-]*)==([0-9][\w.+!]*)", step):
            pins[canonicalize_name(name)] = version
    return pins


def _image_extras() -> list[str]:
    """The extras of the package install, `pip install ".[train]"` -> ["train"]."""
    found = [m for step in _python_steps() for m in re.findall(r"[\"']?\.\[([\w,-]+)\][\"']?", step)]
    assert found, 'images/Dockerfile no longer installs the package as `pip install ".[EXTRAS]"`'
    return [extra for m in found for extra in m.split(",")]


def _package_requirements(extras: list[str]) -> dict[str, Requirement]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        reqs += PYPROJECT["project"]["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def _running_env_drift() -> list[str]:
    """Image pins that differ from what this environment (the README's install, which the tests ran
    against, and whose pip cache the install test reuses) holds."""
    problems = []
    for name, version in _image_pins().items():
        try:
            here = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(
                f"images/Dockerfile installs {name}=={version}, which is not installed where the tests run"
            )
            continue
        if not SpecifierSet(f"=={version}").contains(here, prereleases=True):
            problems.append(
                f"images/Dockerfile pins {name}=={version} but the package's install here resolved {here} "
                f"(the version the tests ran against): update the Dockerfile's pin"
            )
    return problems


def _readme_command() -> str:
    """The README's test command (the line after its `<!-- test-command -->` marker and the fence)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return lines[lines.index("<!-- test-command -->") + 2]


def _imported_modules(package: str) -> set[str]:
    """Top-level modules `package` imports anywhere (in functions too), less the standard library, the
    TYPE_CHECKING-only imports and those guarded by `except ImportError`."""

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.names: set[str] = set()

        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)
            else:
                for child in node.orelse:
                    self.visit(child)

        def visit_Try(self, node: ast.Try) -> None:
            if any("ImportError" in ast.unparse(h.type or ast.Constant(None)) for h in node.handlers):
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            self.names |= {alias.name.split(".")[0] for alias in node.names}

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level == 0 and node.module:
                self.names.add(node.module.split(".")[0])

    visitor = Visitor()
    for path in (ROOT / package).rglob("*.py"):
        visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.names - set(sys.stdlib_module_names) - {"__future__"}


def _shipped_top_level() -> set[str]:
    """Top-level packages the wheel ships, found the way setuptools finds them from pyproject.toml."""
    conf = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    finder = find_namespace_packages if conf.get("namespaces", True) else find_packages
    where = ROOT / conf.get("where", ["."])[0]
    found = finder(str(where), include=conf.get("include", ["*"]), exclude=conf.get("exclude", []))
    return {name.split(".")[0] for name in found}


def _copied_from_context() -> set[str]:
    """Paths the Dockerfile COPYs from the build context (not from another stage)."""
    copied = set()
    for stage in _stages()[1]:
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and not rest.startswith("--from"):
                copied |= {src.rstrip("/") for src in shlex.split(rest)[:-1]}
    return copied


# ---------------------------------------------------------------------------------------------- static


def test_image_copies_everything_the_package_ships():
    """The image builds the wheel from the COPYed files only: a package setuptools finds in the repo but
    the Dockerfile never copies would be left out of the image without an error."""
    copied = _copied_from_context()
    missing = sorted(_shipped_top_level() - copied)
    assert not missing, (
        f"images/Dockerfile never COPYs {missing}, which pyproject.toml ships: add a COPY line"
    )
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed <= copied, f"images/Dockerfile must COPY {sorted(needed - copied)} to build the package"
    absent = sorted(src for src in copied if not (ROOT / src).exists())
    assert not absent, f"images/Dockerfile COPYs {absent}, which the repository does not have"


def test_image_pins_agree_with_the_package():
    """Each `name==version` the image installs satisfies pyproject.toml, equals the version this
    environment's install resolved and every other pin of that name (README, pyproject, the task's
    setup); images/README.md states the build arguments' real defaults."""
    pins = _image_pins()
    assert {"torch", "llama-cpp-python"} <= pins.keys(), f"images/Dockerfile's pins changed shape: {pins}"
    problems = _running_env_drift()
    requirements = _package_requirements(_image_extras())
    for name, version in pins.items():
        req = requirements.get(name)
        if req is not None and not req.specifier.contains(version, prereleases=True):
            problems.append(f"images/Dockerfile pins {name}=={version}, outside pyproject.toml's `{req}`")
        for source in PIN_SOURCES:
            text = (ROOT / source).read_text()
            for other in sorted(set(re.findall(rf"(?<![\w.-]){re.escape(name)}==([0-9][\w.+!]*)", text))):
                if other != version:
                    problems.append(f"images/Dockerfile pins {name}=={version} but {source} pins {other}")
    args = dict(_stages()[0])
    for stage in _stages()[1]:
        for keyword, rest in stage.instructions:
            if keyword == "ARG":
                args.update(_assignments(rest))
    readme = (ROOT / "images" / "README.md").read_text().replace("\n", " ")
    for name, default in args.items():
        for stated in re.findall(rf"`{name}` \(\"?([^\")]+?)\"?[:)]", readme):
            if stated != default:
                problems.append(
                    f"images/README.md says {name} defaults to {stated}, the Dockerfile says {default}"
                )
    assert not problems, "\n".join(problems)


def test_task_setup_skips_on_the_image():
    """tasks/train.yaml's setup skips installing when its import check passes: the image's own smoke
    import (run by the install test) must cover every module that check imports."""
    setup = (ROOT / "tasks" / "train.yaml").read_text()
    checked = re.search(r"if python -c '(import [^;']+)", setup)
    assert checked, "tasks/train.yaml's setup no longer starts with its `python -c 'import ...'` check"
    smoke = [step for step in _python_steps() if re.match(r"python -c [\"']import ", step)]
    assert smoke, 'images/Dockerfile no longer ends with a `python -c "import ..."` smoke check'
    needs = {m.strip() for m in checked[1].removeprefix("import ").split(",")} - {"sys"}
    has = {m.strip() for m in re.search(r"import ([\w, ]+)", smoke[-1])[1].split(",")}
    assert needs <= has, f"the image never imports {sorted(needs - has)}, so the task's setup would reinstall"


# ---------------------------------------------------------------------------------------------- install


def _original_home() -> str:
    """The HOME pytest started with (conftest.py moved HOME into a sandbox): pip's user config (its
    index) and its cache live there; only pip is given it."""
    try:
        start = Path("/proc/self/environ").read_bytes().split(b"\0")
        env = dict(kv.decode(errors="replace").split("=", 1) for kv in start if b"=" in kv)
        return env["HOME"]
    except (OSError, KeyError):
        return pwd.getpwuid(os.getuid()).pw_dir


@dataclass
class Built:
    root: Path
    workdir: Path
    env: dict[str, str]
    cmd: list[str]


def _build(tmp: Path) -> Built:
    """Runs the Dockerfile's python steps stage by stage; returns the last stage."""
    cmake_args = re.search(r"CMAKE_ARGS=(\"[^\"]*\"|\S+)", _readme_command())
    assert cmake_args, "the README's test command no longer sets CMAKE_ARGS for llama-cpp-python"
    # `python3.11` of the image is this interpreter (checked per step): a directory with only that name
    # in it, ahead of the system's, and no venv of this test run on PATH
    shim = tmp / "shim"
    shim.mkdir()
    here = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (shim / here).symlink_to(getattr(sys, "_base_executable", sys.executable))
    system_path = f"{shim}:/usr/bin:/bin"
    base_env = {k: v for k, v in os.environ.items() if k not in CACHE_OFF | {"VIRTUAL_ENV", "PYTHONHOME"}}
    base_env["PIP_COMPILE"] = "0"  # see the module docstring; PIP_NO_COMPILE=1 leaves it on
    pip_home = _original_home()

    roots: dict[str, Path] = {}
    skipped: dict[str, list[str]] = {}
    built = None
    for stage in _stages()[1]:
        root = roots[stage.name] = tmp / f"stage-{stage.name}"
        root.mkdir()
        skipped[stage.name] = []

        def relocate(text: str, root: Path = root) -> str:
            return re.sub(r"(?<![\w.$}:/])/(?=[\w.])", f"{root}/", text)

        args: dict[str, str] = {}
        env: dict[str, str] = {"PATH": system_path}
        workdir, cmd = root, []
        for keyword, rest in stage.instructions:
            if keyword == "ARG":
                args.update(_assignments(rest))
            elif keyword == "ENV":
                for name, value in _assignments(rest).items():
                    if name not in CACHE_OFF:
                        env[name] = _expand(relocate(value), {**args, **env})
            elif keyword == "WORKDIR":
                workdir = Path(relocate(rest))
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                _copy(rest, root, workdir, roots, skipped)
            elif keyword == "RUN":
                for step in _steps(rest):
                    command = _command(step)
                    if command in SYSTEM_STEPS:
                        skipped[stage.name].append(step)
                        continue
                    assert PYTHON_STEP.fullmatch(command), (
                        f"images/Dockerfile runs `{step}`, a kind of step tests/test_image.py does not "
                        f"know: run it here or skip it by name (SYSTEM_STEPS)"
                    )
                    assert not re.fullmatch(r"python3\.\d+", command) or command == here, (
                        f"the image runs {command}; run this test under it (this is {here})"
                    )
                    adapted = re.sub(r"\s--no-cache-dir\b", "", step)
                    adapted = re.sub(
                        r"\bCMAKE_ARGS=(\"[^\"]*\"|'[^']*'|\S+)", f"CMAKE_ARGS={cmake_args[1]}", adapted
                    )
                    step_env = {**base_env, **args, **env}
                    if command == "pip" or " -m pip " in step:
                        step_env["HOME"] = pip_home
                    _sh(relocate(adapted), workdir, step_env, step)
            elif keyword == "CMD":
                cmd = json.loads(rest)
            else:
                pytest.fail(f"images/Dockerfile uses {keyword}, which tests/test_image.py does not model")
        built = Built(root, workdir, env, cmd)
    return built


def _copy(
    rest: str, root: Path, workdir: Path, roots: dict[str, Path], skipped: dict[str, list[str]]
) -> None:
    """COPY: from the repository (the build context) or from an earlier stage's relocated root."""
    words = shlex.split(rest)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    *sources, dest = [w for w in words if not w.startswith("--")]
    target = Path(f"{root}{dest}") if dest.startswith("/") else workdir / dest
    for src in sources:
        if "from" in flags:
            origin = roots[flags["from"]] / src.lstrip("/")
            if not origin.exists():
                # made by a step skipped here (the llama.cpp tools): allowed only if one names it
                made_by = [s for s in skipped[flags["from"]] if src.rstrip("/") in s]
                assert made_by, f"COPY --from={flags['from']} {src}: no step of that stage made it"
                continue
        else:
            origin = ROOT / src
        if origin.is_dir():
            shutil.copytree(origin, target, dirs_exist_ok=True)
        else:
            into = target / origin.name if dest.endswith("/") or len(sources) > 1 else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, into)


def _sh(command: str, cwd: Path, env: dict[str, str], original: str) -> str:
    # /bin/sh, as a RUN in shell form; 20 minutes allow for compiling llama.cpp when pip's cache is cold
    proc = subprocess.run(
        ["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode:
        pytest.fail(
            f"images/Dockerfile's step `{original}` failed here (exit {proc.returncode}) as `{command}`:\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return proc.stdout


# What the built venv is asked, from outside the source tree: versions, the modules `train` imports,
# the package data installed
PROBE = """
import importlib.metadata, importlib.util, json, os, sys
names, modules, data = json.loads(sys.argv[1])
where = lambda p: importlib.util.find_spec(p).submodule_search_locations[0]  # finds, does not import
print(json.dumps({
    "versions": {n: importlib.metadata.version(n) for n in names},
    "missing": [m for m in modules if importlib.util.find_spec(m) is None],
    "no_data": [f"{p}/{f}" for p, f in data if not os.path.isfile(os.path.join(where(p), f))],
}))
"""


def test_image_install_steps_run_in_a_fresh_venv():
    """The image's pip/python steps, run here in order (adapted as the module docstring says), install a
    venv where the smoke import passes, the pins survived `pip install ".[train]"`, every module `train`
    imports is installed, the package data is there, and the image's CMD runs from its WORKDIR."""
    drift = _running_env_drift()
    assert not drift, "\n".join(drift) + "\n(and this test would compile llama-cpp-python for minutes)"
    pins = _image_pins()
    # every data file in the shipped packages (yaml, csv, json today): the image's install is not
    # editable, so a file pyproject's package-data misses is only missing there
    package_data = [
        (pkg, str(f.relative_to(ROOT / pkg)))
        for pkg in sorted(_shipped_top_level())
        for f in sorted((ROOT / pkg).rglob("*"))
        if f.is_file() and f.suffix not in {".py", ".pyc"} and "__pycache__" not in f.parts
    ]
    with tempfile.TemporaryDirectory(prefix="meetara-image-") as tmp:
        built = _build(Path(tmp))
        assert built.cmd[:2] == ["python", "-m"], f"the image's CMD changed shape: {built.cmd}"
        env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONHOME"}} | built.env
        modules = sorted(_imported_modules(built.cmd[2]))
        probe = json.dumps([sorted(pins), modules, package_data])
        found = json.loads(
            _sh(f"python -c {shlex.quote(PROBE)} {shlex.quote(probe)}", built.workdir, env, "probe")
        )
        _sh(shlex.join(built.cmd), built.workdir, env, f"CMD {built.cmd}")

    problems = [
        f"the image ends with {name} {found['versions'][name]}, not its pin {version}: "
        f'`pip install ".[EXTRAS]"` replaced it'
        for name, version in pins.items()
        if not SpecifierSet(f"=={version}").contains(found["versions"][name], prereleases=True)
    ]
    if found["missing"]:
        problems.append(f"{built.cmd[2]} imports {found['missing']}, which the image does not install")
    if found["no_data"]:
        problems.append(
            f"the image's installed package lacks {found['no_data']}: see pyproject's package-data"
        )
    assert not problems, "\n".join(problems)
