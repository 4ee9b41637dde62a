"""The wheel installs one namespace, ffnscope: nothing named app, engine or cache at the top of
site-packages, and the command and its jobs work from a folder holding a user's app.py, engine.py and
cache.py (a Flask or Streamlit project), which `python -m app.cli` used to import instead of ours."""
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

TRAP = "raise SystemExit('imported the user\\'s own {name}.py instead of ffnscope')\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")  # keep the checkout free of build/ and *.egg-info
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--disable-pip-version-check", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300, cwd=build)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("ffnscope-*.whl")
    return path


def test_wheel_holds_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"ffnscope"}, tops
    # every module of the source tree, so a package missing from pyproject.toml's list fails here
    sources = {f"ffnscope/{p.relative_to(ROOT).as_posix()}" for d in ("app", "engine", "cache")
               for p in (ROOT / d).rglob("*.py")}
    assert len(sources) > 60 and not sources - set(names), sorted(sources - set(names))


def test_installed_command_and_jobs_from_a_folder_with_app_py(wheel, tmp_path, model_dirs, text_file):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as zf:  # what pip install --no-deps does for a pure wheel, minus the network
        zf.extractall(site)
    # the dependencies (torch, transformers, ...) from this environment, without its editable ffnscope
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (venv / "bin" / "ffnscope").write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ffnscope.app.cli import main\n"
                                           "sys.exit(main())\n")
    (venv / "bin" / "ffnscope").chmod(0o755)
    assert not {p.name for p in site.iterdir()} & {"app", "engine", "cache"}

    project = tmp_path / "webapp"
    project.mkdir()
    for name in ("app", "engine", "cache"):
        (project / f"{name}.py").write_text(TRAP.format(name=name))
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "FFNSCOPE_CACHE_DIR": str(tmp_path / "uc")}

    def run(*args, timeout=300):
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=project, env=env,
                              timeout=timeout)

    helped = run("ffnscope", "--help")
    assert helped.returncode == 0 and "record" in helped.stdout, helped.stderr
    out = project / "c.h5"
    start = ("import sys; from ffnscope.engine.jobs import launcher as jobs\n"
             "job = jobs.start_record(sys.argv[1], model=sys.argv[2], data=[sys.argv[3]], tokens=256, device='cpu',"
             " seq_len=32, extra=['--samples', '8', '--shard-tokens', '128', '--batch-tokens', '64'], analyze=True)\n"
             "job = jobs.wait(job, timeout=240); print(job.status, job.message)\n")
    started = run(venv / "bin" / "python", "-c", start, out, model_dirs["llama"], text_file)
    assert started.returncode == 0 and started.stdout.startswith("complete"), started.stdout + started.stderr
    listed = run("ffnscope", "jobs", project)
    assert listed.returncode == 0 and "complete" in listed.stdout and "c.h5" in listed.stdout, listed.stdout
    assert "user's own" not in (project / "c.h5.log").read_text()
