"""Run pytest, and when a test kills the process, run the rest without it.

A crash (SIGSEGV, abort) ends pytest at the test in progress and loses
every test after it: on the GPU machine, with minutes of device time, the
tests after the crash would otherwise go unrun until the next session.
This runs ``pytest -v ARGS``, and each time the process dies by a signal it
takes the test in progress from the verbose output and runs again with that
test and every test already reported deselected (at most --max-crashes
times). The output of every run goes to stdout. Exit status: pytest's last
one, or 1 when any run crashed, so a crash still fails the step. A SIGINT
(tools/gpu_session.sh's step limit) reaches pytest, which prints its summary
so far; this script keeps reading until pytest ends.

    python3 tools/pytest_past_crashes.py -m gpu tests/test_cuda_backend.py ...
"""
from __future__ import annotations

import re
import subprocess
import sys

# pytest -v prints "path::name[params] " before running a test and its
# outcome after it, on the same line
_TEST_LINE = re.compile(r"^(\S+::\S+) ")
_OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)\b")


def reported(output: str) -> list[str]:
    """The ids of the tests whose outcome the output reports."""
    return [m.group(1) for line in output.splitlines()
            if (m := _TEST_LINE.match(line)) and _OUTCOME.search(line)]


def test_in_progress(output: str) -> str | None:
    """The id of the test that was running when the output stopped."""
    for line in reversed(output.splitlines()):
        m = _TEST_LINE.match(line)
        if m:
            return None if _OUTCOME.search(line) else m.group(1)
    return None


def main(argv: list[str]) -> int:
    max_crashes = 3
    if argv[:1] == ["--max-crashes"]:
        max_crashes, argv = int(argv[1]), argv[2:]
    crashes: list[str] = []
    done: list[str] = []  # reported by an earlier run that crashed
    while True:
        cmd = [sys.executable, "-m", "pytest", "-v", *argv]
        for t in done + crashes:
            cmd += ["--deselect", t]
        print("$", " ".join(cmd[:len(argv) + 4]), f"(+ {len(done + crashes)} deselected)" if crashes else "",
              flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = []
        while True:
            try:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    out.append(line)
                break
            except KeyboardInterrupt:  # pytest got it too: read its summary
                continue
        rc = proc.wait()
        sys.stdout.flush()
        if rc >= 0:  # pytest ended by itself
            break
        text = "".join(out)
        test = test_in_progress(text)
        print(f"\n== pytest died (signal {-rc}) in {test or 'an unknown test'}", flush=True)
        if test is None or test in crashes:
            crashes.append(test or "?")
            break
        crashes.append(test)
        done += reported(text)
        if len(crashes) > max_crashes:
            break
        print(f"== running the tests after it, without it and the {len(done)} reported\n", flush=True)
    if crashes:
        print("== crashed in: " + " ".join(crashes))
    return 1 if crashes else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
