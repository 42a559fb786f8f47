"""The process-wide CPU settings of the entry points."""

import subprocess
import sys
import unittest
from unittest import mock

from codetr.engine import cpu_runtime, reuse_freed_memory

# Page faults of re-allocating a freed 256 MiB tensor four times inside reuse_freed_memory,
# after three warm-up allocations: the heap grows twice to fit it, at the first and the second
# or third allocation (seen here in 16 runs), then every allocation reuses it (0 faults).
# Run in a fresh process: the settings are process-wide.
_SCRIPT = """
import resource, torch
from codetr.engine import reuse_freed_memory

def faults_of_reallocations(times):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        tensor = torch.ones(64 * 2**20)
        del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with reuse_freed_memory() as configured:
    faults_of_reallocations(3)
    print(configured, faults_of_reallocations(4))
"""


class TestReuseFreedMemory(unittest.TestCase):
    @unittest.skipUnless(sys.platform.startswith("linux"), "configures glibc's allocator")
    def test_reallocations_reuse_the_memory(self):
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True
        ).stdout.split()
        self.assertEqual(out[0], "True")
        # glibc's default maps and faults in the 65536 pages of each allocation anew
        self.assertLess(int(out[1]), 65536)

    def test_restores_the_defaults_on_exit_also_after_an_error(self):
        with mock.patch.object(cpu_runtime, "_mallopt", return_value=True) as mallopt:
            with self.assertRaises(KeyError):
                with reuse_freed_memory() as configured:
                    self.assertTrue(configured)
                    self.assertEqual(mallopt.call_args_list, [mock.call(cpu_runtime._REUSE)])
                    raise KeyError
        self.assertEqual(
            mallopt.call_args_list,
            [mock.call(cpu_runtime._REUSE), mock.call(cpu_runtime._DEFAULTS)],
        )

    def test_does_nothing_without_glibc(self):
        with mock.patch.object(cpu_runtime.sys, "platform", "darwin"):
            with reuse_freed_memory() as configured:
                self.assertFalse(configured)


if __name__ == "__main__":
    unittest.main()
