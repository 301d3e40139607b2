"""Thread selection: a core another process keeps busy is not counted; --threads overrides."""

import os
import subprocess
import sys
import time

import pytest
import torch

from corral.engine.threads import free_cores, use_threads


def test_a_core_held_by_another_process_is_not_counted():
    cores = len(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert free_cores(window_s=0.3) <= max(1, cores - 1)
    finally:
        spinner.kill()
        spinner.wait()


def test_requested_threads_override_and_are_validated():
    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads must be >= 1"):
            use_threads(0)
        assert 1 <= use_threads(None) <= len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)
