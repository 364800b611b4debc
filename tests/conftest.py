import os, tempfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never touch the user's cache: datasets and models made under test go to a fresh folder.
os.environ.setdefault('FREELUNCH_HOME', tempfile.mkdtemp(prefix='freelunch-test-home-'))
os.environ.setdefault('MPLBACKEND', 'Agg')
# Under `pytest -n 2` two workers share the cores: one thread each (and in the processes they start)
# avoids the oversubscription that slows torch down several times.
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch; torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

@pytest.fixture(scope='session')
def root(): return ROOT

import subprocess, sys
FREELUNCH_BIN = str(Path(sys.executable).parent/'freelunch')   # the console script of this environment

def run_cli(*args, check=True):
    "Run the installed `freelunch ARGS` in a subprocess; with `check`, fail unless it exits 0."
    r = subprocess.run([FREELUNCH_BIN, *map(str, args)], capture_output=True, text=True)
    if check: assert r.returncode == 0, r.stdout + r.stderr
    return r

import atexit, shutil
atexit.register(shutil.rmtree, os.environ['FREELUNCH_HOME'], True) if 'freelunch-test-home-' in os.environ['FREELUNCH_HOME'] else None

@pytest.fixture(autouse=True)
def cache_folder_stays():
    "A test (or a chapter run as one) that changes FREELUNCH_HOME fails, and the tests' own folder comes back for the next."
    before = os.environ.get('FREELUNCH_HOME')
    yield
    after = os.environ.get('FREELUNCH_HOME')
    os.environ['FREELUNCH_HOME'] = before
    assert after == before, f"FREELUNCH_HOME was {before!r} before the test and {after!r} after it"

def fl(*args, capsys=None):
    "Run `freelunch ARGS` in this process; (exit code, stdout, stderr)."
    from freelunch.cli import main
    try: main([str(a) for a in args]); code = 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr() if capsys else None
    return code, (out.out if out else ''), (out.err if out else '')

def make_prep(d: Path) -> Path:
    "Three 6-second videos (two for training, one held out) prepared at 5 fps and 32 px under `d`: 60 training frames."
    import numpy as np
    from freelunch.data import write_test_video, write_phase_file, prepare
    for i in (1, 2, 41):
        write_test_video(d/'raw'/'videos'/f'video{i:02d}.mp4', n_frames=150, width=64, height=48, seed=i)
        write_phase_file(d/'raw'/'phase_annotations'/f'video{i:02d}-phase.txt', np.arange(150) // 40)
    prepare(d/'raw', d/'prep', fps=5, size=32, workers=1)
    return d/'prep'

def torchrun(script: Path, *args, timeout: int = 300):
    "Run `script ARGS` in two CPU processes under torchrun (one thread each); the completed process, checked."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r
