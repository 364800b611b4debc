"Every chapter runs top to bottom as a test (nbdev's test_nb, honouring `tst_flags`)."
from configparser import ConfigParser
from pathlib import Path
import pytest
from nbdev import test as nbt   # not `from nbdev.test import test_nb`: pytest would collect it

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))

def _skip_flags():
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    return cfg['DEFAULT'].get('tst_flags', '').split()

def test_there_are_chapters():
    assert {'index.ipynb', '00_core.ipynb', '01_data.ipynb', '14_cli.ipynb'} <= {p.name for p in NBS}

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook_runs(nb, capsys):
    ok, secs = nbt.test_nb(nb, skip_flags=_skip_flags())
    assert ok, f"{nb.name} failed (traceback above)"
