import os
import random
import signal
import threading
import zlib

import pytest
import torch

import r1x

ISA_LEVELS = ["generic", "avx2", "avx512", "amx"]
SESSION_SEED = int(os.environ.get("R1X_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"r1x: cpu isa {r1x._C.detected_cpu_isa()}, test seed {SESSION_SEED} (R1X_TEST_SEED to replay)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # also under -q (which hides the header): a failure can be replayed from CI's log
    if exitstatus != 0:
        terminalreporter.write_line(f"r1x test seed {SESSION_SEED}: rerun with R1X_TEST_SEED={SESSION_SEED}")


# R1X_TEST_TIMEOUT=<seconds>: a test running longer fails with TimeoutError (SIGALRM in the main
# thread), so one hung kernel costs one test, not the whole run (benchmarks/gpu_check.sh sets it).
TEST_TIMEOUT = float(os.environ.get("R1X_TEST_TIMEOUT", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if TEST_TIMEOUT <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past R1X_TEST_TIMEOUT={TEST_TIMEOUT:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def available_isas():
    detected = r1x._C.detected_cpu_isa()
    return ISA_LEVELS[: ISA_LEVELS.index(detected) + 1]


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=devices())
def device(request):
    return request.param


@pytest.fixture(params=available_isas())
def cpu_isa(request):
    """Runs the test once per CPU ISA level this machine can execute (once only when the test's
    `device` is CUDA: the level does not matter there)."""
    if "device" in request.fixturenames and request.getfixturevalue("device") != "cpu":
        if request.param != available_isas()[-1]:
            pytest.skip("CPU ISA levels only matter on the CPU")
    with r1x.use_cpu_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every torch.empty (in Python and C++) comes back filled with NaN / max ints, so an op
    that leaves part of its output unwritten fails its comparison."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
    torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


@pytest.fixture
def gen(request):
    """A fresh generator per test: new inputs every session (seed in the report header),
    reproducible with R1X_TEST_SEED."""
    return torch.Generator().manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
