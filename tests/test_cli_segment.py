"`freelunch segment` end to end on tiny fake CholecSeg8k / m2caiSeg folders, and the errors a user sees."
import json
import pytest
from conftest import run_cli as fl
from freelunch.segment import fake_cholecseg8k, fake_m2caiseg

FAST = ['--model', 'random:tiny', '--size', '32', '--steps', '30']

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp('segment')
    return fake_cholecseg8k(d/'cs', videos=4, frames=3), fake_m2caiseg(d/'m2', train=6, test=2)

def test_help_lists_segment():
    assert 'segment' in fl('--help').stdout
    assert fl('segment', '--help').stdout.startswith('usage: freelunch segment')

def test_segment_within_and_cross(folders, tmp_path):
    cs, m2 = folders
    r = fl('segment', cs, tmp_path/'a', *FAST, '--labels', 3, '--test-videos', '4')
    assert 'mIoU' in r.stdout and 'within-dataset' in r.stdout
    res = json.loads((tmp_path/'a'/'result.json').read_text())
    assert res['test_videos'] == ['video04'] and res['labelled_videos'] == 3 and 0 <= res['miou'] <= 1
    r = fl('segment', cs, tmp_path/'b', *FAST, '--train-data', m2, '--labels', 4)
    res = json.loads((tmp_path/'b'/'result.json').read_text())
    assert res['protocol'] == 'cross-dataset' and len(res['classes']) == 9

@pytest.mark.parametrize('args,msg', [
    (['{cs}', '{out}', '--labels', '50'], 'asked for 50 labelled frames but only 9 are available'),
    (['{tmp}/nowhere', '{out}'], 'no such folder'),
    (['{m2}/train', '{out}'], 'no videoXX folders'),
    (['{cs}', '{out}', '--test-videos', '9'], 'video09 not found'),
])
def test_segment_errors(folders, tmp_path, args, msg):
    cs, m2 = folders
    a = [x.format(cs=cs, m2=m2, tmp=tmp_path, out=tmp_path/'o') for x in args]
    r = fl('segment', *a, *FAST, check=False)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert not (tmp_path/'o'/'result.json').exists()

def test_segment_tips(tmp_path):
    "`--task tips` on a fake folder with tips.csv: PCK printed and written; no tips.csv and too many labels are refused before writing."
    from freelunch.tips import fake_tips
    ft = fake_tips(tmp_path/'ft', videos=4, frames=4)
    r = fl('segment', ft, tmp_path/'t', '--task', 'tips', '--model', 'random:tiny', '--size', '48', '--steps', '30',
           '--labels', 4, '--pck-px', 8)
    assert 'PCK@8px' in r.stdout and 'floor' in r.stdout, r.stdout
    res = json.loads((tmp_path/'t'/'result.json').read_text())
    assert res['task'] == 'tips' and res['test_videos'] == ['video04'] and 0 <= res['pck'] <= 1 and res['test_tips'] > 0
    cs = fake_cholecseg8k(tmp_path/'cs', videos=3, frames=1)
    for f in cs.glob('*/*/tips.csv'): f.unlink()
    for args, msg in [([cs, tmp_path/'o'], 'tips.csv: no tip file'),
                      ([ft, tmp_path/'o', '--labels', 99], 'asked for 99 labelled frames but only'),
                      ([ft, tmp_path/'o', '--pck-px', 0], 'the PCK threshold must be a positive number'),
                      ([ft, tmp_path/'o', '--finetune'], '--train-data and --finetune are for --task segment')]:
        r = fl('segment', *args, '--task', 'tips', '--model', 'random:tiny', '--size', '48', check=False)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert not (tmp_path/'o').exists()
