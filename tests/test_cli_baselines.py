"SimSiam and SwAV from the command line: they train, resume bit for bit, keep SwAV's prototypes frozen then on the sphere, run under DDP, and refuse bad input."
import json
from pathlib import Path
import pytest
import torch
from freelunch.train import load_checkpoint, load_moco, read_metrics
from conftest import make_prep, fl, torchrun

TINY = ['--arch', 'tiny', '--size', '32', '--batch', '8', '--workers', '0']
SIMSIAM = ['--method', 'simsiam', '--proj-dim', '64', '--pred-dim', '16']
SWAV = ['--method', 'swav', '--prototypes', '8', '--queue', '16', '--small-crops', '2', '--small-size', '16',
        '--proj-dim', '16', '--hidden-dim', '32', '--freeze-prototypes', '1', '--queue-start', '0.5']

@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    "Three 6-second videos (two for training, one held out) at 5 fps and 32 px: 60 training frames."
    return make_prep(tmp_path_factory.mktemp('baselines'))

def _ck(run): return load_checkpoint(Path(run)/'checkpoints'/'last.pt')

def _resumes_exactly(prep, tmp_path, opts, epochs=2, stop=5):
    "An uninterrupted run and one stopped after `stop` steps and resumed end bit-identical."
    ref, part = tmp_path/'ref', tmp_path/'part'
    assert fl('pretrain', prep, ref, *opts, *TINY, '--epochs', epochs)[0] == 0
    assert fl('pretrain', prep, part, *opts, *TINY, '--epochs', epochs, '--max-steps', stop, '--ckpt-every', 2)[0] == 0
    assert _ck(part)['step'] == stop
    assert fl('pretrain', prep, part, *opts, *TINY, '--epochs', epochs, '--resume')[0] == 0
    a, b = _ck(ref), _ck(part)
    assert a['step'] == b['step'] == epochs * (60 // 8)
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    assert read_metrics(ref).loss.tolist() == read_metrics(part).loss.tolist()
    return ref

def test_simsiam_trains_and_resumes_exactly(prep, tmp_path):
    ref = _resumes_exactly(prep, tmp_path, SIMSIAM)
    cfg = json.loads((ref/'config.json').read_text())
    assert (cfg['method'], cfg['queue'], cfg['proj_dim'], cfg['stop_grad'], cfg['lr']) == ('simsiam', 0, 64, True, 0.05 * 8 / 256)
    h = read_metrics(ref)
    assert h.knn_top1.notna().all() and (h.z_std > 0).all() and (h.z_std < 1).all()
    assert type(load_moco(ref)).__name__ == 'SimSiam'

def test_swav_trains_resumes_exactly_and_keeps_its_prototypes(prep, tmp_path):
    "Stopped at step 5 (prototypes still frozen, queue filling) and resumed past the unfreezing (step 7): bit-identical."
    ref = _resumes_exactly(prep, tmp_path, SWAV)
    cfg = json.loads((ref/'config.json').read_text())
    assert (cfg['queue'], cfg['prototypes'], cfg['small_size'], cfg['small_crops']) == (16, 8, 16, 2)
    runs = {}
    for steps in (1, 6):                                    # steps 0-6 are the first epoch: prototypes frozen
        r = tmp_path/f'stop{steps}'
        assert fl('pretrain', prep, r, *SWAV, *TINY, '--epochs', 2, '--max-steps', steps)[0] == 0
        runs[steps] = _ck(r)['model']
    end = _ck(ref)['model']
    w1, w6, w14 = runs[1]['prototypes.weight'], runs[6]['prototypes.weight'], end['prototypes.weight']
    assert torch.equal(w1, w6) and not torch.equal(w6, w14)           # frozen through the first epoch, trained after
    assert not torch.equal(runs[1]['backbone.0.weight'], runs[6]['backbone.0.weight'])
    for w in (w1, w14): torch.testing.assert_close(w.norm(dim=1), torch.ones(8))
    assert int(end['queued']) == 16 and int(end['steps']) == 14
    h = read_metrics(ref)
    assert h.knn_top1.notna().all() and (h.prototypes_used >= 1).all()

def test_stop_gradient_off_is_recorded(prep, tmp_path):
    assert fl('pretrain', prep, tmp_path/'r', *SIMSIAM, *TINY, '--epochs', 1, '--stop-grad', 'false')[0] == 0
    assert json.loads((tmp_path/'r'/'config.json').read_text())['stop_grad'] is False

@pytest.mark.parametrize('extra, words', [
    (['--method', 'simsiam', '--prototypes', '8'], 'unknown option(s) prototypes'),
    (['--method', 'swav', '--stop-grad', 'true'], 'unknown option(s) stop_grad'),
    (['--method', 'simsiam', '--queue', '16'], 'SimSiam keeps no queue'),
    (['--method', 'swav', '--queue', '12'], "SwAV's queue of 12 embeddings is not a multiple of the global batch size 8"),
    (['--method', 'swav', '--size', '48'], 'larger than the frames (32 px)'),
    (['--method', 'swav', '--small-size', '32'], 'smaller than the large crops (32 px)'),
    (['--method', 'swav', '--prototypes', '0'], 'prototypes=0'),
])
def test_bad_input_is_refused_before_anything_is_written(prep, tmp_path, capsys, extra, words):
    code, _, err = fl('pretrain', prep, tmp_path/'r', *TINY, '--epochs', 1, '--max-steps', 1, *extra, capsys=capsys)   # (a second --size wins)
    assert code == 2 and words in err, err
    assert not (tmp_path/'r'/'config.json').exists()

def test_bench_names(capsys):
    code, _, err = fl('bench', 'nope', capsys=capsys)
    assert code == 2 and 'simsiam' in err and 'swav' in err

DDP_SCRIPT = r'''
import json, os, sys, torch, torch.distributed as dist
from freelunch.baselines import sinkhorn
from freelunch.train import pretrain
prep, run, out = sys.argv[1:4]
dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)
scores = torch.rand(12, 5) * 2 - 1                    # the same on both ranks; each takes half the batch
res = dict(mine=sinkhorn(scores[6 * rank:6 * (rank + 1)], 0.05, 3).tolist())
# the same process group trains (pretrain joins it; destroying it and joining again races on the rendezvous)
pretrain(prep, run, method='swav', arch='tiny', size=32, epochs=1, batch=16, queue=32, workers=0, quiet=True,
         knn_frames=50, prototypes=8, small_crops=2, small_size=16, proj_dim=16, hidden_dim=32, queue_start=0.0)
with open(os.path.join(out, f'rank{rank}.json'), 'w') as f: json.dump(res, f)
dist.destroy_process_group()
'''

def test_swav_under_ddp_two_processes_gloo(prep, tmp_path):
    "Two CPU processes: Sinkhorn over the two halves of a batch gives the codes of the whole batch; a SwAV run trains."
    from freelunch.baselines import sinkhorn
    script, run = tmp_path/'ddp.py', tmp_path/'run'
    script.write_text(DDP_SCRIPT)
    torchrun(script, prep, run, tmp_path, timeout=900)
    halves = [torch.tensor(json.loads((tmp_path/f'rank{i}.json').read_text())['mine']) for i in (0, 1)]
    torch.manual_seed(0)
    whole = sinkhorn(torch.rand(12, 5) * 2 - 1, 0.05, 3)             # one process, the whole batch
    torch.testing.assert_close(torch.cat(halves), whole, atol=1e-6, rtol=1e-5)
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['world_size'] == 2 and cfg['queue'] == 32
    ck = _ck(run)
    assert ck['step'] == 60 // 16 and tuple(ck['model']['queue'].shape) == (2, 16, 16)   # each process: half the queue
    assert read_metrics(run).knn_top1.notna().all()

def test_reproduce_baselines_rows_in_the_tables_the_findings_and_the_report(tmp_path, capsys):
    "A finished `reproduce` run extended with `--experiments baselines` trains SimSiam and SwAV beside MoCo v2 and Ours (every stage done is reused), scores them the same way and reports them."
    out = tmp_path/'run'
    code, _, err = fl('reproduce', '--preset', 'smoke', '--experiments', 'table1', '--seeds', 2, '--quiet', '--no-report',
                      '--out', out, capsys=capsys)
    assert code == 0, err
    assert '%|' not in err, err[-500:]                                     # --quiet: no progress bar from any stage
    assert 'SimSiam' not in json.loads((out/'metrics.json').read_text())['tables']
    code, printed, err = fl('reproduce', '--preset', 'smoke', '--experiments', 'table1,baselines', '--seeds', 2, '--quiet',
                            '--out', out, capsys=capsys)
    assert code == 0, err
    res = json.loads((out/'metrics.json').read_text())
    assert list(res['tables']) == ['Scratch', 'Free model', 'Teacher', 'MoCo v2', 'Ours', 'SimSiam', 'SwAV']
    done = {s['stage']: s['skipped'] for s in res['stages']}
    assert done['models/moco'] and done['models/ours'] and done['knn/MoCo_v2'] and done['downstream/Ours/f1_s1/tcn']
    assert not done['models/simsiam'] and not done['models/swav'] and not done['knn/SimSiam']
    for m, kind in (('SimSiam', 'simsiam'), ('SwAV', 'swav')):
        cfg = json.loads((Path(res['runs'][m])/'config.json').read_text())
        assert cfg['method'] == kind and cfg['epochs'] == 3 and cfg['arch'] == 'tiny' and cfg['size'] == 32
        assert res['tables'][m]['1']['seeds'] == 2 and m in res['knn']
    claims = [c for c in printed.splitlines() if 'Table 1)' in c]
    assert len(claims) == 4 and any('MoCo v2 > SwAV' in c for c in claims), printed
    html = (out/'report.html').read_text()
    assert html.count('<th>SimSiam</th>') >= 2 and 'SwAV − SimSiam' in html and 'alt="UMAP"' in html
    code, _, err = fl('reproduce', '--preset', 'tiny', '--experiments', 'baselines', '--quiet', '--out', out, capsys=capsys)
    assert code == 2 and 'other settings' in err and 'Traceback' not in err, err

def test_swav_refuses_to_resume_with_another_number_of_processes(prep, tmp_path, capsys):
    "Each process holds queue / world_size of SwAV's queue: a run started on two processes does not resume on one."
    run = tmp_path/'r'
    assert fl('pretrain', prep, run, *SWAV, *TINY, '--epochs', 1)[0] == 0
    cfg = json.loads((run/'config.json').read_text()); cfg['world_size'] = 2
    (run/'config.json').write_text(json.dumps(cfg))                   # as if it had been started under torchrun
    code, _, err = fl('pretrain', prep, run, *SWAV, *TINY, '--epochs', 1, '--resume', capsys=capsys)
    assert code == 2 and 'world_size: 2 now 1' in err and 'Traceback' not in err, err
