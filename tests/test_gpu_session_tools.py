"""tools/pytest_past_crashes.py: the GPU session's pytest step goes on past
a test that kills the process (the first H100 session lost every test after
a segfault), and still fails."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tools", "pytest_past_crashes.py")

SUITE = textwrap.dedent("""
    import os, signal, pytest

    def test_before():
        pass

    @pytest.mark.parametrize("k", ["one", "two"])
    def test_crash(k):
        os.kill(os.getpid(), signal.SIGSEGV)

    def test_after():
        pass

    def test_after_fails():
        assert 1 == 2
""")


def _run(tmp_path, *args):
    (tmp_path / "test_suite.py").write_text(SUITE)
    return subprocess.run([sys.executable, RUNNER, *args, "-p", "no:cacheprovider", "test_suite.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_runs_the_tests_after_each_crash_and_fails(tmp_path):
    r = _run(tmp_path)
    out = r.stdout
    assert r.returncode == 1, out
    assert "crashed in: test_suite.py::test_crash[one] test_suite.py::test_crash[two]" in out
    assert "test_suite.py::test_after PASSED" in out
    assert "test_suite.py::test_after_fails FAILED" in out
    # the test reported before the first crash is not run again
    assert out.count("test_suite.py::test_before PASSED") == 1


def test_stops_after_max_crashes(tmp_path):
    r = _run(tmp_path, "--max-crashes", "1")
    assert r.returncode == 1
    assert "test_suite.py::test_after" not in r.stdout
    assert "crashed in: test_suite.py::test_crash[one] test_suite.py::test_crash[two]" in r.stdout


def test_a_suite_without_crashes_keeps_pytests_status(tmp_path):
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    pass\n")
    r = subprocess.run([sys.executable, RUNNER, "-p", "no:cacheprovider", "test_ok.py"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 passed" in r.stdout and "crashed" not in r.stdout
