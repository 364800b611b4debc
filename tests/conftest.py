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
