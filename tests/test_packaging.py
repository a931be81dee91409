"""Packaging as a user meets it: an sdist that builds, dependencies that do
not pull what a CPU-only user never runs, an import that stays light."""
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sdist_ships_every_file_setup_py_compiles(tmp_path):
    """The sdist's file list (egg_info's SOURCES.txt, which sdist copies)
    holds all of csrc: setuptools alone ships only the ext_modules sources,
    and a build from that sdist failed on the missing AVX2 kernels and
    headers."""
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True)
    (sources,) = glob.glob(str(tmp_path / "*.egg-info" / "SOURCES.txt"))
    with open(sources) as f:
        listed = set(f.read().split())
    csrc = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
            if os.path.isfile(p) and not p.endswith((".o", ".so"))}
    assert csrc and not csrc - listed, sorted(csrc - listed)
