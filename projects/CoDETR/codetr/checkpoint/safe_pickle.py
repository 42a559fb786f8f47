"""
Reading ``.pkl`` weight files (detectron2 and Detectron1 / Caffe2 model zoo) without running
code.

``pickle.load`` calls whatever global a file names (``os.system``, ``builtins.exec``, ...), so a
crafted weight file runs code when it is opened. The unpickler here resolves only the globals
that numpy arrays and plain containers need, and refuses any other.
"""

import _compat_pickle
import pickle
from typing import Any, Tuple

from detectron2.utils.file_io import PathManager

__all__ = ["ALLOWED_PICKLE_GLOBALS", "UnsafePickleError", "load_pickle_weights"]

# "module.name" of every global a weight pickle may name: the numpy array, dtype and scalar
# reconstructors (numpy 1.x ``numpy.core`` and numpy 2.x ``numpy._core`` spellings, and the
# protocol 5 ``_frombuffer``), ``OrderedDict``, the containers that pickle builds by calling
# their type, and ``_codecs.encode``, with which protocol 2 stores ``bytes``.
ALLOWED_PICKLE_GLOBALS = frozenset(
    [
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy._core.numeric._frombuffer",
        "collections.OrderedDict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.complex",
        "_codecs.encode",
    ]
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global that weight files do not need (it could run code)."""


def _python3_name(module: str, name: str) -> Tuple[str, str]:
    """The Python 3 name of a global named in a Python 2 pickle (as ``fix_imports`` maps it)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_PICKLE_GLOBALS`."""

    def __init__(self, file: Any, *, filename: str):
        super().__init__(file, encoding="latin1")
        self.filename = filename

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        qualified = f"{module}.{name}"
        if qualified not in ALLOWED_PICKLE_GLOBALS:
            raise UnsafePickleError(
                f"{self.filename}: refused to unpickle the global {qualified!r}: a weight file "
                "may hold only numpy arrays, numbers, strings and containers (a pickle that "
                "names other globals can run code when it is loaded)"
            )
        return super().find_class(module, name)


def load_pickle_weights(path: str) -> Any:
    """
    Read a pickled weight file (e.g. a detectron2 or Detectron1 model zoo ``.pkl``) as
    detectron2 does (``encoding="latin1"``, for Python 2 pickles), but resolving only the
    globals of :data:`ALLOWED_PICKLE_GLOBALS`.

    Args:
        path: a local path or a ``PathManager`` URL.

    Returns:
        the unpickled object: numpy arrays, numbers, strings, bytes and containers of them.

    Raises:
        UnsafePickleError: the file names another global (e.g. ``posix.system``,
            ``builtins.exec``, torch's tensor reducers); the message names the file and the
            global. Nothing of the file has been executed.
        pickle.UnpicklingError: the file is not a complete pickle.
    """
    with PathManager.open(path, "rb") as f:
        try:
            return _WeightsUnpickler(f, filename=path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError) as e:
            raise pickle.UnpicklingError(f"{path}: not a readable pickle: {e}") from e
