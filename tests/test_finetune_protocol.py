"""The MSN paper's downstream protocol from the command line: `prepare --split 40/8/32` on a small SynthCholec,
`finetune --protocol msn --evaluate test`, model selection on validation F1, resuming runs from before the options."""
import argparse, contextlib, io, json
import numpy as np
import pytest
from freelunch.data import load_index
from freelunch.finetune import (finetune, frame_scores, load_finetuned, add_cli, _protocol, MSN_PROTOCOL,
                                FINETUNE_DEFAULTS)
from freelunch.train import read_metrics, load_checkpoint

FAST = ['--arch', 'tiny', '--size', '32', '--batch', '16']

def fl(*args):
    "Run `freelunch ARGS` in this process: (exit code, stdout, stderr)."
    from freelunch.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: main([str(a) for a in args]); code = 0
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "SynthCholec of 8 videos at 1 fps, 32 px, prepared with --split 40/8/32 (its proportional counterpart: 4/1/3)."
    d = tmp_path_factory.mktemp('protocol')
    assert fl('synth', d/'raw', '--videos', 8, '--minutes', 0.3, '--width', 96, '--height', 54, '--seed', 5)[0] == 0
    code, out, err = fl('prepare', d/'raw', d/'prep', '--fps', 1, '--size', 32, '--workers', 1, '--split', '40/8/32')
    assert code == 0, err
    return d, out

def test_prepare_40_8_32_on_other_videos(data):
    d, out = data
    idx = load_index(d/'prep')
    assert {s: sorted(g.number.unique().tolist()) for s, g in idx.groupby('split')} == \
           {'train': [1, 2, 3, 4], 'val': [5], 'test': [6, 7, 8]}
    assert "proportional counterpart: train 1-4, val 5, test 6-8" in out

def test_msn_protocol_evaluate(data, tmp_path):
    d, run = data[0], tmp_path/'msn'
    code, out, err = fl('finetune', d/'prep', run, '--protocol', 'msn', '--evaluate', 'test', '--epochs', 3,
                        '--lr', '1e-2', '--seed', 4, *FAST)     # here: validation accuracy ties at epochs 1-3, F1 does not
    assert code == 0, err
    assert 'best validation F1' in out and 'video F1' in out and 'scores.json' in out
    c = json.loads((run/'config.json').read_text())
    assert {k: c[k] for k in MSN_PROTOCOL} == {**MSN_PROTOCOL, 'epochs': 3, 'lr': 1e-2}       # given options win
    h = read_metrics(run)
    assert len(h) == 3 and h.val_f1.notna().all() and h.val_acc.notna().all()
    assert h.lr.tolist() == [1e-2] * 3                                                          # constant
    best = load_checkpoint(run/'checkpoints'/'best.pt')
    assert best['epoch'] == int(h.epoch[h.val_f1.idxmax()]) and best['val_f1'] == h.val_f1.max()
    s = json.loads((run/'scores.json').read_text())
    keys = ('video_f1', 'video_accuracy', 'frame_accuracy', 'frame_f1')
    assert set(keys) | {'videos', 'split', 'checkpoint', 'epoch'} <= set(s)
    assert (s['split'], s['checkpoint'], s['epoch'], s['select']) == ('test', 'best', best['epoch'], 'f1')
    assert sorted(s['videos']) == sorted(load_index(d/'prep', 'test').video.unique())
    assert all(0 <= s[k] <= 100 for k in keys)
    assert s['video_f1'] == pytest.approx(np.mean([v['f1'] for v in s['videos'].values()]))
    again = frame_scores(load_finetuned(run), d/'prep', 'test', size=32)        # the best checkpoint, scored again
    assert {k: again[k] for k in keys} == pytest.approx({k: s[k] for k in keys})

    acc = tmp_path/'acc'                                   # the same run, best.pt chosen on validation accuracy instead
    assert fl('finetune', d/'prep', acc, '--protocol', 'msn', '--select', 'accuracy', '--epochs', 3, '--lr', '1e-2',
              '--seed', 4, *FAST)[0] == 0
    ha = read_metrics(acc)
    assert ha[['loss', 'val_acc', 'val_f1']].equals(h[['loss', 'val_acc', 'val_f1']])          # the choice changes no training
    assert load_checkpoint(acc/'checkpoints'/'best.pt')['epoch'] == int(ha.epoch[ha.val_acc.idxmax()])

def test_protocol_fills_only_what_is_not_given():
    p = argparse.ArgumentParser(); add_cli(p.add_subparsers(dest='command'), {})
    a = _protocol(p.parse_args(['finetune', 'P', 'R', '--protocol', 'msn']))
    assert {k: getattr(a, k) for k in MSN_PROTOCOL} == MSN_PROTOCOL and a.evaluate is None
    a = _protocol(p.parse_args(['finetune', 'P', 'R', '--protocol', 'msn', '--select', 'accuracy', '--mode', 'linear']))
    assert (a.select, a.mode, a.augment, a.optimizer) == ('accuracy', 'linear', None, 'adamw')
    a = _protocol(p.parse_args(['finetune', 'P', 'R']))
    assert all(getattr(a, k) is None for k in MSN_PROTOCOL)                                    # no protocol: nothing set

def test_old_config_still_resumes(data, tmp_path):
    d = data[0]
    kw = dict(arch='tiny', size=32, batch=16, epochs=2, quiet=True)
    whole = finetune(d/'prep', tmp_path/'whole', **kw)
    run = finetune(d/'prep', tmp_path/'old', **kw, max_epochs=1)
    c = json.loads((run/'config.json').read_text())
    old = {k: v for k, v in c.items() if k not in FINETUNE_DEFAULTS}                           # as written before the options
    (run/'config.json').write_text(json.dumps(old))
    code, out, err = fl('finetune', d/'prep', run, '--resume', '--epochs', 2, *FAST)
    assert code == 0, err
    assert read_metrics(run).loss.tolist() == read_metrics(whole).loss.tolist()
    assert json.loads((run/'config.json').read_text()) == old
    code, out, err = fl('finetune', d/'prep', run, '--resume', '--epochs', 2, '--select', 'f1', *FAST)
    assert code == 2 and "select: 'accuracy' now 'f1'" in err, err
    code, out, err = fl('finetune', d/'prep', run, '--resume', '--protocol', 'msn', *FAST)
    assert code == 2 and "optimizer: 'adam' now 'adamw'" in err, err

@pytest.mark.parametrize('args,msg', [
    (['--optimizer', 'sgd'], "invalid choice: 'sgd'"),
    (['--schedule', 'cosine'], "invalid choice: 'cosine'"),
    (['--select', 'loss'], "invalid choice: 'loss'"),
    (['--augment', 'mixup'], "invalid choice: 'mixup'"),
    (['--protocol', 'simclr'], "invalid choice: 'simclr'"),
    (['--evaluate', 'testing'], "invalid choice: 'testing'"),
    (['--augment', 'randaugment'], "augment='randaugment' with mode='linear'"),
])
def test_bad_values(data, tmp_path, args, msg):
    code, out, err = fl('finetune', data[0]/'prep', tmp_path/'r', *args, *FAST)
    assert code == 2 and msg in err, err
    assert not (tmp_path/'r').exists()
