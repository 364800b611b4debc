"The downstream commands end to end on a tiny SynthCholec: finetune → extract → tcn → prediction files, and their errors."
import json
import pytest
from conftest import run_cli
import torch
from freelunch.data import read_phase_file, load_index

FAST = ['--arch', 'tiny', '--size', '32']
fl = run_cli

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A prepared SynthCholec of 6 videos (train 3, val 1, test 2) at 1 fps, 32 px, and a 1-epoch MoCo run on it."
    d = tmp_path_factory.mktemp('downstream')
    fl('synth', d/'raw', '--videos', 6, '--minutes', 0.3, '--width', 128, '--height', 72, '--seed', 3)
    fl('prepare', d/'raw', d/'prep', '--fps', 1, '--size', 32, '--workers', 1)
    fl('pretrain', d/'prep', d/'moco', *FAST, '--epochs', 1, '--batch', 8)
    return d

def test_finetune_extract_tcn(data, tmp_path):
    d = data
    r = fl('finetune', d/'prep', tmp_path/'ft', '--init', d/'moco', '--mode', 'full', '--fraction', '0.5',
           '--epochs', 2, '--batch', 16, *FAST)
    assert 'run written to' in r.stdout and 'validation accuracy' in r.stdout
    cfg = json.loads((tmp_path/'ft'/'config.json').read_text())
    train = sorted(load_index(d/'prep', 'train').video.unique())
    assert len(cfg['labelled_videos']) == 2 and set(cfg['labelled_videos']) <= set(train)     # round(0.5 * 3) = 2 videos
    assert cfg['init'] == str((d/'moco').resolve()) and cfg['arch'] == 'tiny'
    assert {p.name for p in (tmp_path/'ft'/'checkpoints').iterdir()} == {'last.pt', 'best.pt'}

    r = fl('extract', d/'prep', tmp_path/'feat', '--run', tmp_path/'ft', '--fps', 0.5)
    man = json.loads((tmp_path/'feat'/'features.json').read_text())
    assert (man['fps'], man['step'], man['size'], man['dim']) == (0.5, 50, 32, 64)
    idx = load_index(d/'prep')
    assert sorted(man['videos']) == sorted(idx.video.unique())
    for v, g in idx.groupby('video'):
        f = torch.load(tmp_path/'feat'/f'{v}.pt', weights_only=True)
        assert f['frames'].tolist() == list(range(0, int(g.frame.max()) + 1, 50))             # every 2nd 1 fps frame
        assert f['phase'].tolist() == g.set_index('frame').phase[f['frames'].tolist()].tolist()
        assert f['features'].shape == (len(f['frames']), 64) and f['features'].isfinite().all()

    r = fl('tcn', tmp_path/'feat', tmp_path/'tcn', '--stages', 2, '--layers', 3, '--epochs', 2, '--seed', 1)
    assert 'predictions of 2 videos' in r.stdout
    test = sorted(idx[idx.split == 'test'].video.unique())
    assert sorted(p.name for p in (tmp_path/'tcn'/'predictions').iterdir()) == [f'{v}-phase.txt' for v in test]
    for v in test:
        pred = read_phase_file(tmp_path/'tcn'/'predictions'/f'{v}-phase.txt', step=50)
        gt = read_phase_file(tmp_path/'tcn'/'ground_truth'/f'{v}-phase.txt', step=50)
        ann = read_phase_file(d/'raw'/'phase_annotations'/f'{v}-phase.txt')
        assert len(pred) == len(gt) == len(torch.load(tmp_path/'feat'/f'{v}.pt', weights_only=True)['frames'])
        assert (gt == ann[::50][:len(gt)]).all()                                            # the annotation at frames 0, 50, ...
        assert pred.min() >= 0 and pred.max() < 7

    r = fl('tcn', tmp_path/'feat', tmp_path/'causal', '--model', 'causal', '--layers', 3, '--epochs', 1, '--splits', 'val,test')
    assert len(list((tmp_path/'causal'/'predictions').iterdir())) == 3

def test_extract_straight_from_a_backbone(data, tmp_path):
    fl('extract', data/'prep', tmp_path/'f1', '--init', 'scratch', '--arch', 'tiny')
    fl('extract', data/'prep', tmp_path/'f2', '--init', data/'moco'/'checkpoints'/'last.pt', '--size', 32)
    a, b = (torch.load(tmp_path/f/'video01.pt', weights_only=True) for f in ('f1', 'f2'))
    assert a['frames'].tolist() == b['frames'].tolist() and a['features'].shape == b['features'].shape
    assert json.loads((tmp_path/'f1'/'features.json').read_text())['fps'] == 1

def test_linear_finetune_keeps_the_backbone(data, tmp_path):
    fl('finetune', data/'prep', tmp_path/'lin', '--init', data/'moco', '--epochs', 1, *FAST)
    ck = torch.load(tmp_path/'lin'/'checkpoints'/'last.pt', weights_only=True)
    moco = torch.load(data/'moco'/'checkpoints'/'last.pt', weights_only=True)['model']
    f = {k.removeprefix('backbone.'): v for k, v in ck['model'].items() if k.startswith('backbone.')}
    assert f and all(torch.equal(v, moco[f'encoder_q.backbone.{k}']) for k, v in f.items())
    assert ck['config']['mode'] == 'linear'

@pytest.mark.parametrize('args,msg', [
    (['finetune', '{prep}', '{tmp}/r', '--fraction', '0', *FAST], 'must be in (0, 1]'),
    (['finetune', '{prep}', '{tmp}/r', '--fraction', '1.5', *FAST], 'must be in (0, 1]'),
    (['finetune', '{prep}', '{tmp}/r', '--init', 'imagenet-nonsense', *FAST], "Unknown backbone 'imagenet-nonsense'"),
    (['finetune', '{prep}', '{tmp}/r', '--init', '{tmp}', *FAST], 'not a freelunch run'),
    (['extract', '{prep}', '{tmp}/f', '--init', 'scratch', '--arch', 'tiny', '--fps', '2'], 'more than the 1 fps'),
    (['extract', '{prep}', '{tmp}/f', '--run', '{prep}'], 'not a fine-tune run'),
    (['tcn', '{tmp}/empty', '{tmp}/o'], 'missing or empty'),
    (['tcn', '{prep}', '{tmp}/o'], 'no features.json'),
])
def test_errors(data, tmp_path, capsys, args, msg):
    "In-process (`freelunch.cli.main`): one line on stderr, exit status 2, nothing written."
    from freelunch.cli import main
    (tmp_path/'empty').mkdir()
    with pytest.raises(SystemExit) as e: main([a.format(prep=data/'prep', tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path/'r').exists() and not (tmp_path/'o').exists()
