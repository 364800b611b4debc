"The library, the notebooks and the README are in sync; the CI runs the README's test command."
import filecmp, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _copy_project(dst):
    for name in ('settings.ini', 'setup.py', 'pyproject.toml', 'README.md'):
        if (ROOT/name).exists(): shutil.copy(ROOT/name, dst/name)
    shutil.copytree(ROOT/'nbs', dst/'nbs', symlinks=True)
    shutil.copytree(ROOT/'freelunch', dst/'freelunch', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(ROOT/'_quarto.yml', dst/'_quarto.yml')

def _run(cmd, cwd):
    exe = Path(sys.executable).parent/cmd
    r = subprocess.run([str(exe)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

def _diff(a, b):
    d = filecmp.dircmp(a, b, ignore=['__pycache__'])
    out = [f"differs: {f}" for f in d.diff_files] + [f"only in repo: {f}" for f in d.left_only] + \
          [f"only after: {f}" for f in d.right_only]
    for sub, sd in d.subdirs.items(): out += [f"{sub}/{x}" for x in _diff(Path(a)/sub, Path(b)/sub)]
    return out

def test_library_matches_notebooks(tmp_path):
    "nbdev_export on the notebooks gives exactly the committed library."
    _copy_project(tmp_path); _run('nbdev_export', tmp_path)
    assert _diff(ROOT/'freelunch', tmp_path/'freelunch') == [], "run nbdev_export and commit freelunch/"

def test_notebooks_are_clean(tmp_path):
    "nbdev_clean changes no notebook."
    _copy_project(tmp_path); _run('nbdev_clean', tmp_path)
    changed = [p.name for p in (ROOT/'nbs').glob('*.ipynb') if p.read_bytes() != (tmp_path/'nbs'/p.name).read_bytes()]
    assert changed == [], f"run nbdev_clean: {changed}"

def test_readme_matches_index():
    "README.md is what tools/make_readme.py makes of nbs/index.ipynb."
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'make_readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

def _readme_commands():
    return re.findall(r'```sh\n(.*?)\n```', (ROOT/'README.md').read_text(), re.S)

def test_ci_runs_the_readme_test_command():
    "The CI entry point runs the README's test command, word for word."
    test_cmd = [c for c in _readme_commands() if 'pytest' in c]
    assert len(test_cmd) == 1
    lines = [l for l in (ROOT/'.ci'/'run').read_text().splitlines() if l.strip()]
    assert lines[-1].strip() == test_cmd[0].strip(), "the last line of .ci/run must be the README's test command"

def test_quarto_config_is_linked():
    "nbdev reads nbs/_quarto.yml; it must be the root _quarto.yml."
    assert (ROOT/'nbs'/'_quarto.yml').resolve() == (ROOT/'_quarto.yml').resolve()
