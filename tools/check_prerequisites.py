#!/usr/bin/env python
"""Checks that torch, torchvision and detectron2 (the prerequisites this project does not
install itself) can be imported; prints how to install a missing one and exits 1."""

import importlib.util
import os
import sys

_PATH = os.path.join(
    os.path.dirname(__file__), "..", "projects", "CoDETR", "codetr", "_prerequisites.py"
)


def main() -> int:
    # load the checker on its own: importing the codetr package would need the prerequisites
    spec = importlib.util.spec_from_file_location("codetr_prerequisites", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.check_prerequisites()
    except ImportError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print("prerequisites found: torch, torchvision, detectron2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
