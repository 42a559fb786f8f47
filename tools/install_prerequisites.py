#!/usr/bin/env python
"""Installs what CoDETR-d2 needs and is missing, in order, and skips what is present:

1. torch and torchvision, from pip's default index or ``$TORCH_INDEX_URL``; when only torch is
   installed (another build, e.g. for another CUDA), only the torchvision that matches it;
2. setuptools (>=64 for the editable install, <81 because detectron2's model_zoo imports
   pkg_resources) and wheel, the build tools of the next two steps;
3. detectron2, built from its public repository at ``DETECTRON2_COMMIT``, or from
   ``$DETECTRON2_SOURCE`` (a source tree, a URL or a wheel);
4. this project (editable) and its own dependencies; with ``--with-test-extras`` also the
   ``test`` extra of setup.cfg (pytest, timm, lvis, shapely, onnx, onnxruntime).

What is present is what the target interpreter imports, in a subprocess (so a half-broken
install counts as missing); a step runs ``python -m pip install ...`` and imports again. What a
detectron2 build needs (git for a git URL, a C++ compiler, the Python headers) is checked before
anything is installed. Standard library only: it runs before torch exists.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

DETECTRON2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
DETECTRON2_GIT_URL = f"git+https://github.com/facebookresearch/detectron2.git@{DETECTRON2_COMMIT}"
SETUPTOOLS_REQUIREMENT = "setuptools>=64,<81"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILERS = ("c++", "g++", "clang++")
STEPS = 4

# What the target interpreter must import; each probe sets `version` (what is shown) or fails.
# They run in this order in one process: setuptools before pip, whose import makes setuptools'
# distutils shim step aside (pkg_resources then fails on the standard library's distutils).
PROBES = {
    "setuptools": "import pkg_resources, setuptools, wheel; version = setuptools.__version__\n"
    "assert 64 <= int(version.split('.')[0]) < 81, f'setuptools {version}, not >=64,<81'",
    "torch": "import torch; version = torch.__version__",
    "torchvision": "import torchvision; version = torchvision.__version__",
    "python_headers": "import os, sysconfig\n"
    "version = os.path.join(sysconfig.get_paths()['include'], 'Python.h')\n"
    "assert os.path.isfile(version), f'{version} does not exist'",
    "detectron2": "import detectron2; version = detectron2.__version__",
    # run in the repository root: the codetr found must be this checkout's (editable install)
    "project": "import os, codetr, fvcore, iopath, scipy, pycocotools, cv2; version = ''\n"
    "where = os.path.realpath(os.path.dirname(codetr.__file__))\n"
    "assert where.startswith(os.path.realpath(os.getcwd()) + os.sep), "
    "f'codetr is imported from {where}, not from this checkout'",
    "test_extras": "import pytest, timm, lvis, shapely, onnx, onnxruntime; version = ''",
    "pip": "import pip; version = pip.__version__",
}
# runs the probes named in argv[1:] in one process; prints {name: [ok, version or error]}
PROBE_RUNNER = """import json, sys
results = {}
for name in sys.argv[1:]:
    scope = {}
    try:
        exec(PROBES[name], scope)
        results[name] = [True, str(scope["version"])]
    except BaseException as e:
        results[name] = [False, f"{type(e).__name__}: {e}"]
print("\\n" + MARKER + json.dumps(results))
"""
MARKER = "install_prerequisites probes: "

TORCH_HINT = (
    "see pip's output above; for another build of PyTorch (a CUDA version, CPU only) set "
    "TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu), or install torch and "
    "torchvision as https://pytorch.org/get-started/locally/ says, then run this again"
)
SETUPTOOLS_HINT = "see pip's output above (is the package index reachable?), then run this again"
DETECTRON2_HINT = (
    "see pip's output above; detectron2 is compiled against the installed torch; to build it "
    "from a local source tree or a mirror, or to install a prebuilt wheel, set "
    "DETECTRON2_SOURCE=PATH|URL|WHEEL, then run this again"
)
PROJECT_HINT = "see pip's output above, then run this again"
PREBUILT = "or set DETECTRON2_SOURCE to a prebuilt detectron2 wheel, then run this again"


class StepFailed(Exception):
    """An expected failure; its message says what failed and what to do."""


@dataclass(frozen=True)
class Step:
    """One numbered step, for the announcements and the error messages."""

    number: int
    name: str

    @property
    def tag(self) -> str:
        return f"[{self.number}/{STEPS}] {self.name}"

    @property
    def title(self) -> str:
        return f"step {self.number}/{STEPS} ({self.name})"


TORCH_STEP = Step(1, "torch, torchvision")
SETUPTOOLS_STEP = Step(2, "setuptools<81, wheel")
DETECTRON2_STEP = Step(3, "detectron2")
PROJECT_STEP = Step(4, "CoDETR-d2 and its dependencies")


@dataclass(frozen=True)
class Detectron2Source:
    """Where detectron2 comes from, and what installing it from there needs."""

    description: str
    pip_args: Tuple[str, ...]
    needs_compiler: bool
    needs_git: bool


Probed = Dict[str, Tuple[bool, str]]


class Installer:
    """Probes and installs into one Python interpreter through its own pip."""

    def __init__(self, *, python: str, dry_run: bool) -> None:
        self.python = python
        self.dry_run = dry_run
        self.installed_something = False

    def probe(self, *, names: Sequence[str]) -> Probed:
        """Runs the named probes in the target interpreter: {name: (ok, version or error)};
        one process for all, or one each when that process dies (e.g. an import crashes)."""
        code = f"PROBES = {PROBES!r}\nMARKER = {MARKER!r}\n{PROBE_RUNNER}"
        try:
            result = subprocess.run(
                [self.python, "-c", code, *names], capture_output=True, text=True, cwd=REPO_ROOT
            )
        except OSError as e:
            raise StepFailed(f"cannot run the Python interpreter {self.python} ({e})") from e
        for line in result.stdout.splitlines():
            if line.startswith(MARKER):
                return {
                    name: (ok, out) for name, (ok, out) in json.loads(line[len(MARKER) :]).items()
                }
        if len(names) > 1:
            return {name: self.probe(names=[name])[name] for name in names}
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return {names[0]: (False, f"the interpreter died: {lines[-1]}")}

    def pip_install(self, *, step: Step, args: Sequence[str], hint: str) -> None:
        """Runs ``python -m pip install args`` in the repository root, pip's output shown."""
        command = [self.python, "-m", "pip", "install", *args]
        print(f"    {'would run' if self.dry_run else 'running'}: {shlex.join(command)}")
        if self.dry_run:
            return
        self.installed_something = True
        if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
            raise StepFailed(f"{step.title} failed (command: {shlex.join(command)}): {hint}")

    def verify(self, *, step: Step, names: Sequence[str], hint: str) -> None:
        """Probes again after an install; fails when an import still does not work."""
        if self.dry_run:
            return
        for ok, output in self.probe(names=names).values():
            if not ok:
                raise StepFailed(
                    f"{step.title} failed: pip finished, but the import still fails ({output}): "
                    f"{hint}"
                )


def detectron2_source(*, value: str) -> Detectron2Source:
    """Interprets DETECTRON2_SOURCE (empty: the pinned commit of the public repository)."""
    if not value:
        return Detectron2Source(
            f"its public repository at commit {DETECTRON2_COMMIT}",
            ("--no-build-isolation", DETECTRON2_GIT_URL),
            needs_compiler=True,
            needs_git=True,
        )
    if "://" in value:
        is_wheel = value.endswith(".whl")
        return Detectron2Source(
            f"DETECTRON2_SOURCE={value}",
            (value,) if is_wheel else ("--no-build-isolation", value),
            needs_compiler=not is_wheel,
            needs_git=value.startswith("git+"),
        )
    path = os.path.abspath(value)
    if not os.path.exists(path):
        raise StepFailed(
            f"{DETECTRON2_STEP.title} cannot run: DETECTRON2_SOURCE={value} does not exist: set "
            "it to a detectron2 source tree, an archive or wheel file, or a URL"
        )
    if path.endswith(".whl"):
        return Detectron2Source(f"the wheel {path}", (path,), needs_compiler=False, needs_git=False)
    return Detectron2Source(
        f"the source {path}", ("--no-build-isolation", path), needs_compiler=True, needs_git=False
    )


def find_compiler(*, environ: Mapping[str, str]) -> Optional[str]:
    """The C++ compiler a build would use: $CXX when set, else c++, g++ or clang++ on PATH."""
    cxx = environ.get("CXX", "").strip()
    candidates = [shlex.split(cxx)[0]] if cxx else list(COMPILERS)
    path = environ.get("PATH", os.defpath)
    for candidate in candidates:
        found = shutil.which(candidate, path=path)
        if found:
            return found
    return None


def check_build_needs(
    *, source: Detectron2Source, probed: Probed, python: str, environ: Mapping[str, str]
) -> None:
    """Fails, before anything is installed, when installing detectron2 cannot work."""
    prefix = f"{DETECTRON2_STEP.title} cannot run"
    if source.needs_git and not shutil.which("git", path=environ.get("PATH", os.defpath)):
        raise StepFailed(
            f"{prefix}: git not found (needed to fetch {DETECTRON2_GIT_URL}): install it, e.g. "
            "`apt-get install git`, or set DETECTRON2_SOURCE to a local detectron2 source tree, "
            "an archive URL or a wheel, then run this again"
        )
    if not source.needs_compiler:
        return
    if find_compiler(environ=environ) is None:
        cxx = environ.get("CXX", "")
        looked_for = f"$CXX={cxx}" if cxx else "$CXX, " + ", ".join(COMPILERS)
        raise StepFailed(
            f"{prefix}: no C++ compiler found (looked for {looked_for}): install one, e.g. "
            f"`apt-get install g++`, {PREBUILT}"
        )
    has_headers, error = probed["python_headers"]
    if not has_headers:
        raise StepFailed(
            f"{prefix}: the Python development headers of {python} are missing ({error}): "
            f"install them, e.g. `apt-get install python3-dev`, {PREBUILT}"
        )


def install_torch(*, installer: Installer, probed: Probed, index_url: str) -> None:
    """Step 1: torch and torchvision, or only the torchvision matching an installed torch."""
    step = TORCH_STEP
    has_torch, torch_version = probed["torch"]
    has_vision, vision_version = probed["torchvision"]
    if has_torch and has_vision:
        print(
            f"{step.tag}: already installed (torch {torch_version}, torchvision "
            f"{vision_version}), skipping"
        )
        return
    where = f"from {index_url}" if index_url else "from pip's default index"
    if has_torch:
        print(
            f"{step.tag}: torch {torch_version} is installed, torchvision is not: installing the "
            f"torchvision that matches it, {where}"
        )
        requirements = ["torchvision", f"torch=={torch_version}"]
    else:
        print(f"{step.tag}: installing torch and torchvision {where}")
        requirements = ["torch", "torchvision"]
    index = ["--index-url", index_url] if index_url else []
    installer.pip_install(step=step, args=[*requirements, *index], hint=TORCH_HINT)
    installer.verify(step=step, names=["torch", "torchvision"], hint=TORCH_HINT)


def install_setuptools(*, installer: Installer, probed: Probed, again: bool) -> None:
    """Step 2: setuptools>=64,<81 and wheel; ``again`` after the later steps, which may have
    upgraded setuptools past 80 (and so removed pkg_resources)."""
    step = SETUPTOOLS_STEP
    found, output = probed["setuptools"]
    if found:
        if not again:
            print(f"{step.tag}: already installed (setuptools {output}), skipping")
        return
    reason = "a later step changed it" if again else "missing or unusable"
    print(f"{step.tag}: installing {SETUPTOOLS_REQUIREMENT} and wheel ({reason}: {output})")
    installer.pip_install(step=step, args=[SETUPTOOLS_REQUIREMENT, "wheel"], hint=SETUPTOOLS_HINT)
    installer.verify(step=step, names=["setuptools"], hint=SETUPTOOLS_HINT)


def install_detectron2(
    *, installer: Installer, probed: Probed, source: Optional[Detectron2Source]
) -> None:
    """Step 3: detectron2 from ``source`` (None when it is installed)."""
    step = DETECTRON2_STEP
    if source is None:
        print(f"{step.tag}: already installed ({probed['detectron2'][1]}), skipping")
        return
    print(f"{step.tag}: installing from {source.description}")
    installer.pip_install(step=step, args=source.pip_args, hint=DETECTRON2_HINT)
    installer.verify(step=step, names=["detectron2"], hint=DETECTRON2_HINT)


def install_project(*, installer: Installer, probed: Probed, with_test_extras: bool) -> None:
    """Step 4: this project, editable, with its dependencies (and the ``test`` extra)."""
    step = PROJECT_STEP
    names = ["project", "test_extras"] if with_test_extras else ["project"]
    if all(probed[name][0] for name in names):
        print(f"{step.tag}: already installed, skipping")
        return
    target = ".[test]" if with_test_extras else "."
    reasons = "; ".join(probed[name][1] for name in names if not probed[name][0])
    print(f"{step.tag}: installing {target} (editable) from {REPO_ROOT} ({reasons})")
    installer.pip_install(step=step, args=["--no-build-isolation", "-e", target], hint=PROJECT_HINT)
    installer.verify(step=step, names=names, hint=PROJECT_HINT)


def install_all(
    *, installer: Installer, environ: Mapping[str, str], with_test_extras: bool
) -> None:
    """Probes everything once, checks what installing detectron2 needs, then the four steps."""
    probed = installer.probe(names=list(PROBES))
    present = {name for name, (ok, _) in probed.items() if ok}
    needed = {"torch", "torchvision", "setuptools", "detectron2", "project"}
    if with_test_extras:
        needed.add("test_extras")
    if not needed <= present and "pip" not in present:
        raise StepFailed(
            f"pip is not available for {installer.python} ({probed['pip'][1]}): install it, "
            f"e.g. `{installer.python} -m ensurepip --upgrade` or `apt-get install "
            "python3-pip`, then run this again"
        )
    source = None
    if "detectron2" not in present:
        source = detectron2_source(value=environ.get("DETECTRON2_SOURCE", ""))
        check_build_needs(source=source, probed=probed, python=installer.python, environ=environ)
    install_torch(installer=installer, probed=probed, index_url=environ.get("TORCH_INDEX_URL", ""))
    install_setuptools(installer=installer, probed=probed, again=False)
    install_detectron2(installer=installer, probed=probed, source=source)
    install_project(installer=installer, probed=probed, with_test_extras=with_test_extras)
    if installer.installed_something:  # torch or a dependency may have upgraded setuptools
        probed = installer.probe(names=["setuptools"])
        install_setuptools(installer=installer, probed=probed, again=True)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Install what CoDETR-d2 needs and is missing: torch and torchvision, "
        "setuptools<81 and wheel, detectron2, this project. Environment: TORCH_INDEX_URL "
        "(pip index for torch/torchvision), DETECTRON2_SOURCE=PATH|URL|WHEEL (instead of "
        f"detectron2's repository at commit {DETECTRON2_COMMIT}).",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter to install into (default: the one running this script)",
    )
    parser.add_argument(
        "--with-test-extras",
        action="store_true",
        help="also install the test extra (pytest, timm, lvis, shapely, onnx, onnxruntime)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the pip commands instead of running them"
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # our lines and pip's output, in order
    # subprocesses run in the repository root: a relative interpreter path is made absolute
    python = os.path.abspath(args.python) if os.sep in args.python else args.python
    installer = Installer(python=python, dry_run=args.dry_run)
    try:
        install_all(installer=installer, environ=os.environ, with_test_extras=args.with_test_extras)
    except StepFailed as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ERROR: interrupted; run this again to go on where it stopped", file=sys.stderr)
        return 130
    print("dry run: nothing installed" if args.dry_run else "all prerequisites are installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
