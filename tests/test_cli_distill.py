"The free lunch from the command line: offline free model, teacher (ordinary and fast), distillation, exact resume, and the errors a user sees."
import json, os
from pathlib import Path
import numpy as np
import pytest
import torch
from freelunch.train import load_checkpoint, load_moco, read_metrics
from freelunch.zoo import generic_run, load_backbone
from conftest import make_prep, fl

TINY = ['--size', '32', '--batch', '8', '--queue', '32', '--workers', '0']

@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    "Three 6-second videos (two for training, one held out) at 5 fps and 32 px: 60 training frames."
    return make_prep(tmp_path_factory.mktemp('distill'))

@pytest.fixture(scope='module', autouse=True)
def own_home(tmp_path_factory):
    "This module's models live in a FREELUNCH_HOME of their own: the chapters' tests (other workers) train a different offline model."
    old = os.environ['FREELUNCH_HOME']
    os.environ['FREELUNCH_HOME'] = str(tmp_path_factory.mktemp('home'))
    yield
    os.environ['FREELUNCH_HOME'] = old

@pytest.fixture(scope='module')
def generic():
    "The offline free model (tiny ConvNet, a few steps on dead-leaves images) in the test's FREELUNCH_HOME."
    code, _, _ = fl('pretrain-generic', '--arch', 'tiny', '--images', 64, '--image-size', 32, '--size', 32,
                    '--epochs', 1, '--batch', 16, '--workers', 0)
    assert code == 0
    return generic_run('tiny')

def _same(a: dict, b: dict, prefix=''):
    for k in a:
        if k.startswith(prefix): assert torch.equal(a[k], b[k]), k

def test_pretrain_generic_is_cached_and_loadable(generic, capsys):
    assert str(generic).startswith(os.environ['FREELUNCH_HOME'])
    cfg = json.loads((generic/'config.json').read_text())
    assert cfg['prep'].startswith('dead-leaves') and cfg['arch'] == 'tiny'
    step = load_checkpoint(generic/'checkpoints'/'last.pt')['step']
    assert step == 64 // 16
    code, out, _ = fl('pretrain-generic', '--arch', 'tiny', '--images', 64, '--image-size', 32, '--size', 32,
                      '--epochs', 1, '--batch', 16, '--workers', 0, capsys=capsys)
    assert code == 0 and 'generic' in out and load_checkpoint(generic/'checkpoints'/'last.pt')['step'] == step
    assert load_backbone('generic', arch='tiny').out_dim == 64

def test_teacher_keeps_the_free_backbone(prep, generic, tmp_path):
    for extra in ([], ['--fast', '--pool', 3]):
        run = tmp_path/f"teacher{len(extra)}"
        code, _, _ = fl('pretrain', prep, run, '--method', 'teacher', '--free', 'generic', '--arch', 'tiny', *TINY,
                        '--epochs', 2, *extra)
        assert code == 0
        cfg = json.loads((run/'config.json').read_text())
        assert (cfg['variant'], cfg['bn'], cfg['fast'], cfg['bn_splits']) == ('head', 'eval', bool(extra), 1)
        free = load_checkpoint(generic/'checkpoints'/'last.pt')['model']
        ck = load_checkpoint(run/'checkpoints'/'last.pt')['model']
        for k in free:                                  # θ_q and θ_k of the teacher both start from the free f_q, and keep it
            if k.startswith('encoder_q.backbone.'):
                assert torch.equal(free[k], ck[k]) and torch.equal(free[k], ck['encoder_k.' + k[10:]]), k
        assert not torch.equal(free['encoder_q.head.0.weight'], ck['encoder_q.head.0.weight'])   # the heads trained
        assert read_metrics(run).knn_top1.notna().all()
    assert (tmp_path/'teacher3'/'cache'/'view_pool.pt').is_file() and not (tmp_path/'teacher0'/'cache').exists()

def test_distill_resumes_exactly_and_keeps_the_teacher(prep, generic, tmp_path):
    "A distillation run stopped after 3 steps and resumed ends bit-identical to an uninterrupted one; the teacher never moves."
    teacher = tmp_path/'teacher'
    assert fl('pretrain', prep, teacher, '--method', 'teacher', '--free', 'generic', '--arch', 'tiny', *TINY, '--epochs', 1)[0] == 0
    args = ['pretrain', prep, None, '--method', 'distill', '--teacher', teacher, '--arch', 'tiny', *TINY, '--epochs', 2]
    args[2] = tmp_path/'ref'; assert fl(*args)[0] == 0
    args[2] = tmp_path/'part'; assert fl(*args, '--max-steps', 3)[0] == 0
    assert load_checkpoint(tmp_path/'part'/'checkpoints'/'last.pt')['step'] == 3
    assert fl(*args, '--resume')[0] == 0
    a, b = (load_checkpoint(tmp_path/r/'checkpoints'/'last.pt') for r in ('ref', 'part'))
    assert a['step'] == b['step'] == 2 * (60 // 8)
    assert json.loads((tmp_path/'ref'/'config.json').read_text())['teacher_precision'] == 'auto'   # int8 teacher, calibrated alike
    _same(a['model'], b['model'])
    assert int(a['model']['filled']) == 32 and torch.equal(a['model']['student.queue.ptr'], a['model']['teacher_queue.ptr'])
    t = load_checkpoint(teacher/'checkpoints'/'last.pt')['model']
    for side in ('q', 'k'):
        for k, v in t.items():
            if k.startswith(f'encoder_{side}.'): assert torch.equal(a['model'][f'teacher_{side}.' + k[10:]], v), k
    m = read_metrics(tmp_path/'ref')
    assert (m.l_dis > 0).all() and np.allclose(m.loss, m.l_con + 5 * m.l_dis, atol=1e-4)
    assert load_moco(tmp_path/'ref').backbone.out_dim == 64
    cfg = json.loads((tmp_path/'ref'/'config.json').read_text())
    assert (cfg['lam'], cfg['tau_t'], cfg['positive'], cfg['teacher_views']) == (5.0, 0.07, True, 2)

def test_distill_options_and_init_from_teacher(prep, generic, tmp_path):
    teacher = tmp_path/'teacher'
    assert fl('pretrain', prep, teacher, '--method', 'teacher', '--free', 'generic', '--arch', 'tiny', *TINY, '--epochs', 1)[0] == 0
    run = tmp_path/'student'
    assert fl('pretrain', prep, run, '--method', 'distill', '--teacher', teacher, '--arch', 'tiny', *TINY, '--epochs', 1,
              '--lambda', 2.5, '--tau-t', 0.2, '--positive', 'false', '--teacher-views', 1, '--init', 'teacher',
              '--max-steps', 1)[0] == 0
    cfg = json.loads((run/'config.json').read_text())
    assert (cfg['lam'], cfg['tau_t'], cfg['positive'], cfg['teacher_views']) == (2.5, 0.2, False, 1)
    assert cfg['init'] == str(teacher.resolve())
    init = tmp_path/'init'                                      # Table 2: MoCo started from the teacher's backbone
    assert fl('pretrain', prep, init, '--arch', 'tiny', *TINY, '--epochs', 1, '--init', teacher, '--max-steps', 1)[0] == 0
    assert json.loads((init/'config.json').read_text())['init'] == str(teacher.resolve())

class Sneaky:
    def __reduce__(self): return (os.mkdir, (os.environ['FREELUNCH_HOME'] + '/pwned',))

def test_free_models_in_every_layout_and_errors(prep, generic, tmp_path, capsys):
    "A teacher starts from checkpoint files in MoCo's layout; a wrong layout and a pickle that runs code are refused."
    from freelunch.moco import backbone, mlp_head
    torch.manual_seed(0)
    f, h = backbone('tiny'), mlp_head(64)
    moco = {'epoch': 1, 'arch': 'tiny', 'state_dict': {
        **{f'module.encoder_q.{k}': v for k, v in f.state_dict().items()},
        **{f'module.encoder_q.fc.{k}': v for k, v in h.state_dict().items()},
        **{f'module.encoder_k.{k}': v for k, v in f.state_dict().items()},
        'module.queue': torch.randn(128, 32), 'module.queue_ptr': torch.zeros(1, dtype=torch.long)}}
    torch.save(moco, tmp_path/'moco.pth.tar')
    torch.save({**f.state_dict(), 'fc.weight': torch.zeros(10, 64)}, tmp_path/'tv.pth')
    torch.save({'state_dict': {'module.encoder_q.0.weight': f.state_dict()['0.weight'], 'module.encoder_q.attn.w': torch.zeros(2)}},
               tmp_path/'wrong.pth')
    torch.save({'state_dict': f.state_dict(), 'x': Sneaky()}, tmp_path/'sneaky.pth')
    for name in ('moco.pth.tar', 'tv.pth'):
        run = tmp_path/name.split('.')[0]
        assert fl('pretrain', prep, run, '--method', 'teacher', '--free', tmp_path/name, *TINY, '--epochs', 1, '--max-steps', 1)[0] == 0
        ck = load_checkpoint(run/'checkpoints'/'last.pt')['model']
        assert torch.equal(ck['encoder_q.backbone.0.weight'], f.state_dict()['0.weight'])
        assert torch.equal(ck['encoder_k.head.2.weight'], h.state_dict()['2.weight']) == (name == 'moco.pth.tar')
    capsys.readouterr()
    for args, msg in [(['--method', 'teacher', '--free', tmp_path/'wrong.pth'], 'unexpected keys: attn.w'),
                      (['--method', 'teacher', '--free', tmp_path/'sneaky.pth'], 'refused'),
                      (['--method', 'distill', '--arch', 'tiny'], 'needs a teacher'),
                      (['--method', 'moco', '--free', 'generic', '--arch', 'tiny'], 'unknown option(s) free'),
                      (['--method', 'teacher', '--free', 'generic', '--arch', 'tiny', '--variant', 'both', '--fast'], '--fast needs'),
                      (['--method', 'teacher', '--free', 'moco_v9'], 'moco_v2_800ep')]:
        code, _, err = fl('pretrain', prep, tmp_path/'err', *args, *TINY, capsys=capsys)
        assert code == 2 and msg in err and 'Traceback' not in err, (args, err)
    assert not Path(os.environ['FREELUNCH_HOME'], 'pwned').exists()

def test_zoo_list_offline(capsys):
    code, out, _ = fl('zoo', 'list', capsys=capsys)
    assert code == 0 and 'moco_v2_800ep' in out and 'resnet50_supervised' in out and 'dead-leaves models' in out
    lite = next(l for l in out.splitlines() if l.startswith('efficientnet_lite0_imagenet'))
    assert 'installed, offline' in lite and 'download' in next(l for l in out.splitlines() if l.startswith('moco_v2_800ep'))

def test_teacher_defaults_to_the_imagenet_model(prep, tmp_path):
    "Without --free the teacher is EfficientNet-Lite0 from PyPI: its backbone is the package's weights, frozen; its heads train."
    from freelunch.zoo import load_encoder
    run = tmp_path/'teacher'
    assert fl('pretrain', prep, run, '--method', 'teacher', '--fast', '--pool', 2, *TINY, '--epochs', 1, '--lr', 0.01)[0] == 0
    cfg = json.loads((run/'config.json').read_text())
    assert (cfg['free'], cfg['arch']) == ('efficientnet_lite0_imagenet', 'efficientnet_lite0')
    f, _ = load_encoder('efficientnet_lite0_imagenet')
    ck = load_checkpoint(run/'checkpoints'/'last.pt')['model']
    for k, v in f.state_dict().items(): assert torch.equal(ck['encoder_q.backbone.' + k], v), k
    student = tmp_path/'student'                # a student of another architecture distils it
    assert fl('pretrain', prep, student, '--method', 'distill', '--teacher', run, '--arch', 'tiny', *TINY, '--max-steps', 2)[0] == 0
    assert json.loads((student/'config.json').read_text())['teacher_arch'] == 'efficientnet_lite0'

def test_teacher_variant_that_trains_nothing(prep, generic, tmp_path):
    "Table 3's 'none' variant has no optimiser: it runs to the end (it used to crash) and changes no weight."
    run = tmp_path/'none'
    assert fl('pretrain', prep, run, '--method', 'teacher', '--free', 'generic', '--arch', 'tiny', '--variant', 'none',
              *TINY, '--epochs', 2)[0] == 0
    ck = load_checkpoint(run/'checkpoints'/'last.pt')
    assert ck['step'] == 2 * (60 // 8) and len(read_metrics(run)) == 2
    start = load_checkpoint(generic/'checkpoints'/'last.pt')['model']
    for k, v in ck['model'].items():
        if k.startswith('encoder_q.backbone.'): assert torch.equal(start[k], v), k

def test_a_damaged_package_model_is_refused(monkeypatch, capsys, tmp_path, prep):
    "The PyPI file is checked against its SHA-256 when loaded: a mismatch names the file and both values."
    from dataclasses import replace
    from freelunch import zoo
    monkeypatch.setitem(zoo.ZOO, 'efficientnet_lite0_imagenet', replace(zoo.ZOO['efficientnet_lite0_imagenet'], sha256='0' * 64))
    monkeypatch.setattr(zoo, '_CHECKED', {})
    code, _, err = fl('pretrain', prep, tmp_path/'t', '--method', 'teacher', *TINY, capsys=capsys)
    assert code == 2 and 'efficientnet-lite0-57934424.pth' in err and '0' * 64 in err and 'damaged' in err, err
