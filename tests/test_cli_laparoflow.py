"Laparoflow-SSL from the command line: prepare adds DIS flow to a prepared folder, the dense method trains, resumes bit for bit, runs under DDP, feeds what loads backbones, and refuses bad input before writing anything."
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from freelunch.train import load_checkpoint, load_moco, read_metrics
from conftest import make_prep, fl, torchrun

TINY = ['--arch', 'tiny', '--size', '32', '--batch', '8', '--workers', '0']
LF = ['--method', 'laparoflow', '--flow', 'dis']

@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    "The 60-frame prepared folder of the other CLI tests, with DIS flow added by a second `prepare`."
    d = tmp_path_factory.mktemp('lf')
    p = make_prep(d)
    assert fl('prepare', d/'raw', p, '--fps', 5, '--size', 32, '--workers', 1, '--flow', 'dis')[0] == 0
    return p

def test_prepare_adds_flow_for_every_frame(prep):
    from freelunch.data import load_index, flow_file, read_flow
    ix = load_index(prep)
    for r in ix.itertuples(): assert read_flow(flow_file(prep, 'dis', r.video, r.frame), 32).shape == (32, 32, 2)
    assert json.loads((prep/'prepared.json').read_text())['flow'] == ['dis']

@pytest.fixture(scope='module')
def runs(prep, tmp_path_factory):
    "A 2-epoch run, and the same run stopped after 5 steps and resumed."
    d = tmp_path_factory.mktemp('lfrun')
    ref, part = d/'ref', d/'part'
    assert fl('pretrain', prep, ref, *LF, *TINY, '--epochs', 2, '--sigma', '0.5')[0] == 0
    assert fl('pretrain', prep, part, *LF, *TINY, '--epochs', 2, '--sigma', '0.5', '--max-steps', 5, '--ckpt-every', 2)[0] == 0
    assert load_checkpoint(part/'checkpoints'/'last.pt')['step'] == 5
    assert fl('pretrain', prep, part, *LF, *TINY, '--epochs', 2, '--sigma', '0.5', '--resume')[0] == 0
    return ref, part

def test_laparoflow_resumes_bit_for_bit(runs):
    ref, part = runs
    a, b = (load_checkpoint(r/'checkpoints'/'last.pt') for r in (ref, part))
    assert a['step'] == b['step'] == 2 * (60 // 8)
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    h = read_metrics(ref)
    assert h.loss.tolist() == read_metrics(part).loss.tolist()
    assert ((h.positive_share > 0) & (h.positive_share <= 1)).all() and h.knn_top1.notna().all()
    cfg = json.loads((ref/'config.json').read_text())
    assert (cfg['method'], cfg['flow'], cfg['sigma'], cfg['grid'], cfg['queue']) == ('laparoflow', 'dis', 0.5, 4, 0)

def test_the_run_is_a_backbone_for_everything_downstream(runs):
    from freelunch.zoo import load_backbone
    from freelunch.dense import feature_map
    ref, _ = runs
    m = load_moco(ref)
    assert type(m).__name__ == 'DenseContrast' and m.backbone is m.encoder_q.backbone
    q, k = dict(m.encoder_q.named_parameters()), dict(m.encoder_k.named_parameters())
    assert any(not torch.equal(q[n], k[n]) for n in q)                                  # the momentum twin lags
    f = load_backbone(ref).eval()
    assert feature_map(f, torch.zeros(1, 3, 32, 32)).shape == (1, 64, 4, 4) and f.arch == 'tiny'

def test_flow_changes_what_is_learnt(prep, tmp_path):
    "The same seed with and without flow: the first steps' losses differ (the weights are not the spatial ones alone)."
    for fw in ('dis', 'none'):
        assert fl('pretrain', prep, tmp_path/fw, '--method', 'laparoflow', '--flow', fw, *TINY, '--epochs', 1, '--sigma', '0.3',
                  '--max-steps', 3, '--rho', '0.3')[0] == 0
    a, b = (load_checkpoint(tmp_path/fw/'checkpoints'/'last.pt') for fw in ('dis', 'none'))
    assert any(not torch.equal(a['model'][k], b['model'][k]) for k in a['model'] if k.startswith('encoder_q'))

@pytest.mark.parametrize('extra,words', [
    (['--flow', 'truth'], 'no complete truth flow'),
    (['--sigma', '0'], '--sigma must be > 0'),
    (['--rho', '-1'], '--rho must be > 0'),
])
def test_bad_input_is_refused_before_anything_is_written(prep, tmp_path, capsys, extra, words):
    code, _, err = fl('pretrain', prep, tmp_path/'r', '--method', 'laparoflow', *TINY, '--epochs', 1, *extra, capsys=capsys)
    assert code == 2 and words in err and 'Traceback' not in err, err
    assert not (tmp_path/'r'/'config.json').exists()

def test_a_folder_without_flow_is_told_how_to_get_it(tmp_path, capsys):
    p = make_prep(tmp_path)
    code, _, err = fl('pretrain', p, tmp_path/'r', *LF, *TINY, '--epochs', 1, capsys=capsys)
    assert code == 2 and f'freelunch prepare RAW {p} --flow dis' in err, err
    code, _, err = fl('prepare', tmp_path/'raw', p, '--fps', 5, '--size', 32, '--flow', 'raft', capsys=capsys)
    assert code == 2 and 'choose from dis, truth' in err, err

def test_bench_names_laparoflow(capsys):
    code, _, err = fl('bench', 'nope', capsys=capsys)
    assert code == 2 and 'laparoflow' in err

DDP_SCRIPT = r'''
import sys, torch.distributed as dist
from freelunch.train import pretrain
prep, run = sys.argv[1:3]
dist.init_process_group('gloo')
pretrain(prep, run, method='laparoflow', arch='tiny', size=32, epochs=1, batch=16, workers=0, quiet=True, knn_frames=50, flow='dis')
dist.destroy_process_group()
'''

def test_laparoflow_under_ddp_two_processes_gloo(prep, tmp_path):
    script, run = tmp_path/'ddp.py', tmp_path/'run'
    script.write_text(DDP_SCRIPT)
    torchrun(script, prep, run, timeout=600)
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['world_size'] == 2 and load_checkpoint(run/'checkpoints'/'last.pt')['step'] == 60 // 16
    assert np.isfinite(read_metrics(run).loss).all()
