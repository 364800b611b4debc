"MSN from the command line: it trains a ViT, resumes bit for bit with its AdamW schedules, runs under DDP (Sinkhorn, the mean prediction and the prototypes' gradients over both processes), feeds the downstream commands, and refuses bad input before writing anything."
import json, math
from pathlib import Path
import pytest
import torch
from freelunch.train import load_checkpoint, load_moco, read_metrics
from conftest import make_prep, fl, torchrun

TINY = ['--size', '32', '--batch', '8', '--workers', '0']
MSN = ['--method', 'msn', '--arch', 'vit-tiny', '--focal-views', '2', '--prototypes', '16', '--proj-dim', '16',
       '--hidden-dim', '32', '--mask-ratio', '0.25']

@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    "Three 6-second videos (two for training, one held out) at 5 fps and 32 px: 60 training frames."
    return make_prep(tmp_path_factory.mktemp('msn'))

@pytest.fixture(scope='module')
def msn_run(prep, tmp_path_factory):
    "A 2-epoch MSN run, and the same run stopped after 5 steps and resumed."
    d = tmp_path_factory.mktemp('msnrun')
    ref, part = d/'ref', d/'part'
    assert fl('pretrain', prep, ref, *MSN, *TINY, '--epochs', 2)[0] == 0
    assert fl('pretrain', prep, part, *MSN, *TINY, '--epochs', 2, '--max-steps', 5, '--ckpt-every', 2)[0] == 0
    assert load_checkpoint(part/'checkpoints'/'last.pt')['step'] == 5
    assert fl('pretrain', prep, part, *MSN, *TINY, '--epochs', 2, '--resume')[0] == 0
    return ref, part

def test_msn_resumes_bit_for_bit_with_its_schedules(msn_run):
    from freelunch.msn import cosine_wd, warmup_cosine
    ref, part = msn_run
    a, b = (load_checkpoint(r/'checkpoints'/'last.pt') for r in (ref, part))
    total = 2 * (60 // 8)
    assert a['step'] == b['step'] == total
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    assert read_metrics(ref).loss.tolist() == read_metrics(part).loss.tolist()
    cfg = json.loads((ref/'config.json').read_text())
    assert (cfg['method'], cfg['arch'], cfg['lr'], cfg['wd'], cfg['focal_size'], cfg['queue']) == ('msn', 'vit-tiny', 1e-3, 0.04, 16, 0)
    groups = a['optimizer']['param_groups']                      # AdamW: scheduled decay on weights only
    assert 'exp_avg_sq' in next(iter(a['optimizer']['state'].values()))
    assert math.isclose(groups[0]['weight_decay'], cosine_wd(total - 1, total, 0.04, 0.4)) and groups[0]['wd_schedule']
    assert groups[1]['weight_decay'] == groups[2]['weight_decay'] == 0.0
    warm = round(cfg['warmup'] * (60 // 8))
    assert math.isclose(groups[0]['lr'], warmup_cosine(total - 1, total, warm, 1e-3, 2e-4, 1e-6))
    h = read_metrics(ref)
    assert h.knn_top1.notna().all() and (h.prototypes_used >= 1).all() and (h.prototypes_used <= 8).all()

def test_msn_run_is_a_vit_for_everything_downstream(msn_run, prep, tmp_path):
    "load_moco rebuilds MSN; the target ViT is the backbone; the prototypes trained; finetune and extract take the run."
    ref, _ = msn_run
    m = load_moco(ref)
    assert type(m).__name__ == 'MSN' and m.backbone is m.target.backbone and m.backbone.arch == 'vit-tiny'
    torch.manual_seed(0)
    fresh = load_moco.__globals__['get_method']('msn')().build(json.loads((ref/'config.json').read_text()))
    assert not torch.equal(fresh.prototypes, m.prototypes)                       # (built the same way: they moved)
    online, target = dict(m.encoder.named_parameters()), dict(m.target.named_parameters())
    assert any(not torch.equal(online[k], target[k]) for k in online)             # the EMA lags the encoder
    assert fl('finetune', prep, tmp_path/'ft', '--init', ref, '--mode', 'full', '--epochs', 1, '--batch', 16,
              '--size', 32)[0] == 0
    assert json.loads((tmp_path/'ft'/'config.json').read_text())['arch'] == 'vit-tiny'
    assert fl('extract', prep, tmp_path/'feat', '--run', tmp_path/'ft', '--fps', 1)[0] == 0
    assert json.loads((tmp_path/'feat'/'features.json').read_text())['dim'] == 128

@pytest.mark.parametrize('extra,words', [
    (['--mask-ratio', '1.0'], '[0, 1)'),
    (['--focal-size', '32'], 'not smaller than the random view'),
    (['--size', '28'], 'choose --size 24 or 32'),
    (['--arch', 'resnet18'], 'choose one of vit-tiny'),
    (['--queue', '16'], 'keeps no queue'),
    (['--focal-views', '-1'], 'give 0 or more focal views'),
])
def test_bad_input_is_refused_before_anything_is_written(prep, tmp_path, capsys, extra, words):
    code, _, err = fl('pretrain', prep, tmp_path/'r', *MSN, *TINY, '--epochs', 1, *extra, capsys=capsys)
    assert code == 2 and words in err and 'Traceback' not in err, err
    assert not (tmp_path/'r'/'config.json').exists()

def test_a_convnet_init_for_msn_and_a_vit_init_for_moco_are_refused(prep, msn_run, tmp_path, capsys):
    ref, _ = msn_run
    assert fl('pretrain', prep, tmp_path/'moco', '--arch', 'tiny', *TINY, '--epochs', 1, '--max-steps', 1)[0] == 0
    code, _, err = fl('pretrain', prep, tmp_path/'a', *MSN, *TINY, '--epochs', 1, '--init', tmp_path/'moco', capsys=capsys)
    assert code == 2 and 'is a tiny backbone' in err and 'MSN trains ViTs' in err, err
    code, _, err = fl('pretrain', prep, tmp_path/'b', '--arch', 'tiny', *TINY, '--epochs', 1, '--init', ref, capsys=capsys)
    assert code == 2 and 'is a vit-tiny backbone' in err and 'give --arch vit-tiny' in err, err
    assert not (tmp_path/'a').exists() and not (tmp_path/'b').exists()
    assert fl('pretrain', prep, tmp_path/'c', *MSN, *TINY, '--epochs', 1, '--max-steps', 1, '--init', ref)[0] == 0

def test_bench_names_msn(capsys):
    code, _, err = fl('bench', 'nope', capsys=capsys)
    assert code == 2 and 'msn' in err

DDP_SCRIPT = r'''
import json, os, sys, torch, torch.distributed as dist
from freelunch.msn import msn_loss
from freelunch.train import pretrain
prep, run, out = sys.argv[1:4]
dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)
za, zt, Q = torch.randn(2, 8, 6), torch.randn(8, 6), torch.randn(5, 6)   # 2 anchor views × 8 frames; each rank takes 4 frames
mine = slice(4 * rank, 4 * (rank + 1))
a, q = za[:, mine].reshape(8, 6).requires_grad_(), Q.clone().requires_grad_()
loss = msn_loss(a, zt[mine], q)[0]
loss.backward()
res = dict(loss=loss.item(), q_grad=q.grad.tolist())
pretrain(prep, run, method='msn', arch='vit-tiny', size=32, epochs=1, batch=16, workers=0, quiet=True, knn_frames=50,
         focal_views=2, prototypes=16, proj_dim=16, hidden_dim=32)
with open(os.path.join(out, f'rank{rank}.json'), 'w') as f: json.dump(res, f)
dist.destroy_process_group()
'''

def test_msn_under_ddp_two_processes_gloo(prep, tmp_path):
    "Two CPU processes, half a batch each: the mean of their losses and of their prototype gradients (what DDP averages) equal one process on the whole batch; an MSN run trains."
    from freelunch.msn import msn_loss
    script, run = tmp_path/'ddp.py', tmp_path/'run'
    script.write_text(DDP_SCRIPT)
    torchrun(script, prep, run, tmp_path, timeout=900)
    r = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1)]
    torch.manual_seed(0)
    za, zt, Q = torch.randn(2, 8, 6), torch.randn(8, 6), torch.randn(5, 6)
    q = Q.clone().requires_grad_()
    whole = msn_loss(za.reshape(16, 6), zt, q)[0]
    whole.backward()
    assert math.isclose((r[0]['loss'] + r[1]['loss']) / 2, whole.item(), rel_tol=1e-5)
    torch.testing.assert_close((torch.tensor(r[0]['q_grad']) + torch.tensor(r[1]['q_grad'])) / 2, q.grad, atol=1e-6, rtol=1e-4)
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['world_size'] == 2 and load_checkpoint(run/'checkpoints'/'last.pt')['step'] == 60 // 16
    assert read_metrics(run).knn_top1.notna().all()

def test_reproduce_msn_rows_the_protocol_and_the_report(tmp_path, capsys):
    "`reproduce --experiments msn` trains MSN beside MoCo v2, scores it like Table 1's rows, runs both through the MSN paper's protocol (fine-tuning chosen on validation F1, per-video F1 on test), and reports it."
    out = tmp_path/'run'
    code, printed, err = fl('reproduce', '--preset', 'smoke', '--experiments', 'msn', '--seeds', 2, '--quiet', '--out', out,
                            capsys=capsys)
    assert code == 0, err
    res = json.loads((out/'metrics.json').read_text())
    assert list(res['tables']) == ['MoCo v2', 'MSN'] and res['tables']['MSN']['1']['seeds'] == 2 and 'MSN' in res['knn']
    cfg = json.loads((Path(res['runs']['MSN'])/'config.json').read_text())
    assert (cfg['method'], cfg['arch'], cfg['epochs'], cfg['lr']) == ('msn', 'vit-tiny', 3, 1e-3)
    rows = res['protocol']
    assert sorted((r['method'], r['fraction']) for r in rows) == [('MSN', 0.5), ('MSN', 1.0), ('MoCo v2', 0.5), ('MoCo v2', 1.0)]
    for r in rows: assert all(0 <= r[k] <= 100 for k in ('video_f1', 'video_accuracy', 'frame_accuracy', 'frame_f1')), r
    ft = json.loads((out/'protocol'/'MSN'/'f1_s0'/'run'/'config.json').read_text())
    from freelunch.pipeline import PRESETS
    assert (ft['optimizer'], ft['select'], ft['mode'], ft['lr'], ft['arch']) == ('adamw', 'f1', 'full', PRESETS['smoke']['msn_protocol']['lr'], 'vit-tiny')
    assert res['protocol_tables']['MSN']['1']['video_f1']['mean'] == round(next(r['video_f1'] for r in rows if r['method'] == 'MSN' and r['fraction'] == 1.0), 2)
    assert "the MSN paper's protocol, video F1" in printed and 'MSN: 50 % of the labels match 100 %' in printed, printed
    html = (out/'report.html').read_text()
    assert "The MSN paper's protocol" in html and 'alt="label efficiency, MSN protocol"' in html
