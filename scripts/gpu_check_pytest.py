"""pytest plugin of ``scripts/gpu_check.py``: one line per test as it ends.

``GPU-CHECK-TEST <passed|failed|skipped|error> <node id>`` goes to the
terminal output (the stage's log) the moment each test ends, so a run stopped
at its deadline still tells how many tests passed and which failed. With
pytest-xdist only the controller writes (it receives every worker's reports;
a worker's stdout is its channel to the controller).
"""
import sys

_WRITE = True


def pytest_configure(config):
    global _WRITE
    _WRITE = not hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    if not _WRITE:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome if report.when == "call" or report.skipped else "error"
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    else:
        return
    sys.__stdout__.write(f"GPU-CHECK-TEST {outcome} {report.nodeid}\n")
    sys.__stdout__.flush()
