"""tools/install_prerequisites.py against a fake interpreter: its imports see only stub packages
in a temporary directory, and its `-m pip` records the arguments (and installs stubs) instead of
installing anything. No real pip, no network."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO_ROOT, "tools", "install_prerequisites.py")

_spec = importlib.util.spec_from_file_location("install_prerequisites", SCRIPT)
install_prerequisites = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_prerequisites)

GIT_URL = install_prerequisites.DETECTRON2_GIT_URL
SETUPTOOLS = install_prerequisites.SETUPTOOLS_REQUIREMENT

# `-m pip install ...` appends {"args", "cwd"} to $FAKE_PIP_LOG, fails (exit 1) when an argument
# contains $FAKE_PIP_FAIL, and otherwise writes the stubs of what it was asked for (none with
# $FAKE_PIP_NO_EFFECT; also setuptools 84 with $FAKE_PIP_UPGRADES_SETUPTOOLS). Anything else
# runs in the real interpreter without site-packages (-S), the stubs on PYTHONPATH.
FAKE_PYTHON = """#!{python} -S
import json, os, sys

SITE = os.environ["FAKE_SITE"]

def stub(name, version="1.0"):
    os.makedirs(os.path.join(SITE, name), exist_ok=True)
    with open(os.path.join(SITE, name, "__init__.py"), "w") as f:
        f.write(f"__version__ = {{version!r}}\\n")
        if name == "codetr":  # an editable install of the checkout it is imported from
            f.write({editable!r})

def setuptools(version):
    for name, v in (("setuptools", version), ("pkg_resources", version), ("wheel", "0.45.1")):
        stub(name, v)

args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:
    with open(os.environ["FAKE_PIP_LOG"], "a") as f:
        f.write(json.dumps({{"args": args[2:], "cwd": os.getcwd()}}) + "\\n")
    fail = os.environ.get("FAKE_PIP_FAIL")
    if fail and any(fail in arg for arg in args):
        sys.exit(1)
    if os.environ.get("FAKE_PIP_NO_EFFECT"):
        sys.exit(0)
    if os.environ.get("FAKE_PIP_UPGRADES_SETUPTOOLS"):
        setuptools("84.0.0")
    for arg in args[3:]:
        if arg == "torch":
            stub("torch", "2.14.1")
        elif arg == "torchvision":
            stub("torchvision", "0.29.1")
        elif arg.startswith("setuptools"):
            setuptools("80.9.0")
        elif "detectron2" in arg:
            stub("detectron2", "0.6")
        elif arg in (".", ".[test]"):
            for name in ("codetr", "fvcore", "iopath", "scipy", "pycocotools", "cv2"):
                stub(name)
            if arg == ".[test]":
                for name in ("pytest", "timm", "lvis", "shapely", "onnx", "onnxruntime"):
                    stub(name)
    sys.exit(0)
env = dict(os.environ, PYTHONPATH=SITE)
os.execve(sys.executable, [sys.executable, "-S", *args], env)
"""

# what a stub codetr appends to say it is the editable install of the checkout the probe runs in
EDITABLE_CODETR = "import os\n__file__ = os.path.join(os.getcwd(), 'projects', 'CoDETR', 'codetr', '__init__.py')\n"

TORCH = {"torch": "2.14.1", "torchvision": "0.29.1"}
BUILD_TOOLS = {"setuptools": "80.9.0", "pkg_resources": "80.9.0", "wheel": "0.45.1"}
PROJECT = dict.fromkeys(("codetr", "fvcore", "iopath", "scipy", "pycocotools", "cv2"), "1.0")
TEST_EXTRAS = dict.fromkeys(("pytest", "timm", "lvis", "shapely", "onnx", "onnxruntime"), "1.0")
PIP = {"pip": "24.0"}
ALL = {**TORCH, **BUILD_TOOLS, "detectron2": "0.6", **PROJECT, **TEST_EXTRAS}

TORCH_CALL = ["install", "torch", "torchvision"]
SETUPTOOLS_CALL = ["install", SETUPTOOLS, "wheel"]
DETECTRON2_CALL = ["install", "--no-build-isolation", GIT_URL]
PROJECT_CALL = ["install", "--no-build-isolation", "-e", "."]


class TestInstallPrerequisites(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        self.site = os.path.join(self.tmp, "site")
        self.bin = os.path.join(self.tmp, "bin")
        os.makedirs(self.site)
        os.makedirs(self.bin)
        self.log = os.path.join(self.tmp, "pip.log")
        self.python = os.path.join(self.tmp, "python")
        with open(self.python, "w") as f:
            f.write(FAKE_PYTHON.format(python=sys.executable, editable=EDITABLE_CODETR))
        os.chmod(self.python, 0o755)

    def _install(self, modules):
        for name, version in modules.items():
            os.makedirs(os.path.join(self.site, name))
            with open(os.path.join(self.site, name, "__init__.py"), "w") as f:
                f.write(f"__version__ = {version!r}\n")
                if name == "codetr" and version != "another checkout":
                    f.write(EDITABLE_CODETR)

    def _tools(self, *names):
        for name in names:
            path = os.path.join(self.bin, name)
            with open(path, "w") as f:
                f.write("#!/bin/sh\nexit 0\n")
            os.chmod(path, 0o755)

    def _run(self, *args, installed, tools=("g++", "git"), **env):
        """Runs the script with `installed` stubs and `tools` on PATH (its only entry); returns
        (exit status, stdout, stderr, the recorded pip argument lists)."""
        self._install(installed)
        self._tools(*tools)
        environ = {
            name: value
            for name, value in os.environ.items()
            if name not in ("CXX", "DETECTRON2_SOURCE", "TORCH_INDEX_URL", "PYTHONPATH")
        }
        environ.update(PATH=self.bin, FAKE_SITE=self.site, FAKE_PIP_LOG=self.log, **env)
        result = subprocess.run(
            [sys.executable, SCRIPT, "--python", self.python, *args],
            capture_output=True,
            text=True,
            env=environ,
            timeout=60,
        )
        calls = []
        if os.path.exists(self.log):
            with open(self.log) as f:
                records = [json.loads(line) for line in f]
            self.assertEqual({record["cwd"] for record in records}, {REPO_ROOT})
            calls = [record["args"] for record in records]
        self.assertNotIn("Traceback", result.stderr)
        return result.returncode, result.stdout, result.stderr, calls

    def test_the_default_detectron2_is_the_public_repository_at_a_pinned_commit(self):
        prefix = "git+https://github.com/facebookresearch/detectron2.git@"
        self.assertTrue(GIT_URL.startswith(prefix))
        self.assertRegex(GIT_URL[len(prefix) :], "^[0-9a-f]{40}$")

    def test_nothing_installed_installs_everything_in_order(self):
        status, out, err, calls = self._run(installed=PIP)
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [TORCH_CALL, SETUPTOOLS_CALL, DETECTRON2_CALL, PROJECT_CALL])
        self.assertIn("[1/4] torch, torchvision: installing torch and torchvision", out)
        self.assertIn("[3/4] detectron2: installing from its public repository at commit", out)
        self.assertIn("all prerequisites are installed", out)

    def test_test_extras_and_torch_index_url(self):
        url = "https://download.pytorch.org/whl/cpu"
        status, _, err, calls = self._run("--with-test-extras", installed=PIP, TORCH_INDEX_URL=url)
        self.assertEqual(status, 0, err)
        self.assertEqual(
            calls,
            [
                TORCH_CALL + ["--index-url", url],
                SETUPTOOLS_CALL,
                DETECTRON2_CALL,
                ["install", "--no-build-isolation", "-e", ".[test]"],
            ],
        )

    def test_torch_only_installs_the_matching_torchvision(self):
        status, out, err, calls = self._run(installed={**PIP, "torch": "2.14.1"})
        self.assertEqual(status, 0, err)
        self.assertEqual(
            calls,
            [
                ["install", "torchvision", "torch==2.14.1"],
                SETUPTOOLS_CALL,
                DETECTRON2_CALL,
                PROJECT_CALL,
            ],
        )
        self.assertIn("torch 2.14.1 is installed, torchvision is not", out)

    def test_all_present_installs_nothing_and_needs_no_compiler(self):
        status, out, err, calls = self._run("--with-test-extras", installed=ALL, tools=())
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [])
        self.assertEqual(out.count("skipping"), 4)
        self.assertIn("already installed (torch 2.14.1, torchvision 0.29.1), skipping", out)
        self.assertIn("[3/4] detectron2: already installed (0.6), skipping", out)

    def test_project_installed_from_another_checkout_is_installed_from_this_one(self):
        installed = {**ALL, **PIP, "codetr": "another checkout"}
        status, out, err, calls = self._run("--with-test-extras", installed=installed, tools=())
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [["install", "--no-build-isolation", "-e", ".[test]"]])
        self.assertIn("not from this checkout", out)

    def test_setuptools_too_new_for_pkg_resources_is_replaced(self):
        installed = {**ALL, **PIP, "setuptools": "84.0.0", "pkg_resources": "84.0.0"}
        status, out, err, calls = self._run(installed=installed, tools=())
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [SETUPTOOLS_CALL])
        self.assertIn("setuptools 84.0.0, not >=64,<81", out)

    def test_setuptools_upgraded_by_a_later_step_is_replaced_again(self):
        installed = {name: v for name, v in ALL.items() if name not in PROJECT}
        status, out, err, calls = self._run(
            installed={**installed, **PIP}, tools=(), FAKE_PIP_UPGRADES_SETUPTOOLS="1"
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [PROJECT_CALL, SETUPTOOLS_CALL])
        self.assertIn("a later step changed it", out)

    def test_detectron2_source_directory_is_built_instead_of_the_git_url(self):
        source = os.path.join(self.tmp, "detectron2-src")
        os.makedirs(source)
        installed = {name: v for name, v in ALL.items() if name != "detectron2"}
        status, out, err, calls = self._run(
            installed={**installed, **PIP}, tools=("g++",), DETECTRON2_SOURCE=source
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [["install", "--no-build-isolation", source]])
        self.assertIn(f"installing from the source {source}", out)

    def test_detectron2_source_url_is_built_instead_of_the_git_url(self):
        url = "https://mirror.example/detectron2-02b5c4e.tar.gz"
        installed = {name: v for name, v in ALL.items() if name != "detectron2"}
        status, _, err, calls = self._run(
            installed={**installed, **PIP}, tools=("g++",), DETECTRON2_SOURCE=url
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [["install", "--no-build-isolation", url]])

    def test_detectron2_wheel_needs_no_compiler(self):
        wheel = os.path.join(self.tmp, "detectron2-0.6-cp311-cp311-linux_x86_64.whl")
        open(wheel, "w").close()
        status, out, err, calls = self._run(installed=PIP, tools=(), DETECTRON2_SOURCE=wheel)
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [TORCH_CALL, SETUPTOOLS_CALL, ["install", wheel], PROJECT_CALL])
        self.assertIn(f"installing from the wheel {wheel}", out)

    def test_missing_detectron2_source_fails_before_installing(self):
        missing = os.path.join(self.tmp, "nowhere")
        status, _, err, calls = self._run(installed=PIP, DETECTRON2_SOURCE=missing)
        self.assertEqual(status, 1)
        self.assertEqual(calls, [])
        self.assertIn(f"DETECTRON2_SOURCE={missing} does not exist", err)

    def test_no_compiler_fails_before_installing_anything(self):
        status, _, err, calls = self._run(installed=PIP, tools=("git",))
        self.assertEqual(status, 1)
        self.assertEqual(calls, [])
        self.assertIn("ERROR: step 3/4 (detectron2) cannot run: no C++ compiler found", err)
        self.assertIn("(looked for $CXX, c++, g++, clang++)", err)
        self.assertIn("apt-get install g++", err)
        self.assertIn("DETECTRON2_SOURCE", err)

    def test_a_missing_cxx_compiler_is_named(self):
        status, _, err, calls = self._run(installed=PIP, CXX="g++-13")
        self.assertEqual(status, 1)
        self.assertEqual(calls, [])
        self.assertIn("no C++ compiler found (looked for $CXX=g++-13)", err)

    def test_no_git_for_the_default_source_fails_before_installing_anything(self):
        status, _, err, calls = self._run(installed=PIP, tools=("g++",))
        self.assertEqual(status, 1)
        self.assertEqual(calls, [])
        self.assertIn("git not found", err)

    def test_missing_python_headers_fail_before_installing_anything(self):
        with open(os.path.join(self.site, "sysconfig.py"), "w") as f:
            f.write("def get_paths():\n    return {'include': '/nowhere'}\n")
        status, _, err, calls = self._run(installed=PIP)
        self.assertEqual(status, 1)
        self.assertEqual(calls, [])
        self.assertIn("Python development headers", err)
        self.assertIn("/nowhere/Python.h does not exist", err)

    def test_missing_pip_is_named(self):
        status, _, err, calls = self._run(installed={})
        self.assertEqual(status, 1)
        self.assertEqual(calls, [])
        self.assertIn(f"pip is not available for {self.python}", err)
        self.assertIn("ensurepip", err)

    def test_failing_pip_names_the_step_and_stops(self):
        status, out, err, calls = self._run(installed=PIP, FAKE_PIP_FAIL="detectron2")
        self.assertEqual(status, 1)
        self.assertEqual(calls, [TORCH_CALL, SETUPTOOLS_CALL, DETECTRON2_CALL])
        command = f"{self.python} -m pip install --no-build-isolation {GIT_URL}"
        self.assertIn(f"ERROR: step 3/4 (detectron2) failed (command: {command})", err)
        self.assertIn("DETECTRON2_SOURCE=PATH|URL|WHEEL", err)
        self.assertNotIn("all prerequisites are installed", out)

    def test_an_install_that_still_does_not_import_fails(self):
        status, _, err, calls = self._run(installed=PIP, FAKE_PIP_NO_EFFECT="1")
        self.assertEqual(status, 1)
        self.assertEqual(calls, [TORCH_CALL])
        self.assertIn("ERROR: step 1/4 (torch, torchvision) failed: pip finished", err)
        self.assertIn("No module named 'torch'", err)
        self.assertIn("TORCH_INDEX_URL", err)

    def test_dry_run_prints_the_commands_and_runs_none(self):
        status, out, err, calls = self._run("--dry-run", installed=PIP)
        self.assertEqual(status, 0, err)
        self.assertEqual(calls, [])
        self.assertIn(f"would run: {self.python} -m pip install torch torchvision", out)
        self.assertIn(f"would run: {self.python} -m pip install --no-build-isolation -e .", out)
        self.assertIn("dry run: nothing installed", out)


if __name__ == "__main__":
    unittest.main()
