"""Importing the project has no side effects; the entry points explain missing prerequisites."""

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_importing_the_packages_registers_nothing():
    result = _run(
        "import sys, codetr\n"
        "assert 'torch' not in sys.modules, 'import codetr imported torch'\n"
        "import codetr.data, codetr.engine, codetr.evaluation, codetr.modeling\n"
        "from detectron2.data import DatasetCatalog\n"
        "print(sorted(name for name in DatasetCatalog.list() if 'codetr' in name))\n"
        "import codetr_toy\n"
        "print(sorted(name for name in DatasetCatalog.list() if 'codetr' in name))\n"
        "codetr_toy.register_toy_datasets()\n"
        "print(sorted(name for name in DatasetCatalog.list() if 'codetr' in name))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "[]", "['codetr_toy_train', 'codetr_toy_val']"]


@pytest.mark.parametrize("entry_point", ["train_net", "demo"])
def test_entry_points_explain_a_missing_prerequisite(entry_point):
    # detectron2 made unimportable: the entry point stops at its first line with the fix
    result = _run(f"import sys; sys.modules['detectron2'] = None; import {entry_point}")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: CoDETR-d2 needs 'detectron2'"), last_line
    assert "make install" in last_line
