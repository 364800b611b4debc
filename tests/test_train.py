"MoCo pretraining: exact resume after SIGKILL, two processes with DDP (gloo) on the CPU, and a NaN loss that stops the run."
import json, random, signal, subprocess, sys, time
import pytest
import torch
import torch.nn as nn
from freelunch.moco import tiny_convnet
from freelunch.train import pretrain, load_checkpoint, read_metrics, TrainingDiverged
from conftest import make_prep, torchrun

TINY = dict(arch='tiny', size=32, epochs=3, batch=8, workers=0, ckpt_every=1, seed=0, quiet=True, knn_frames=50)

@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    "Three 6-second videos (two for training, one held out) at 5 fps and 32 px: 60 training frames."
    return make_prep(tmp_path_factory.mktemp('train'))

def _start(prep, run, resume=False, log=None):
    code = f"from freelunch.train import pretrain; pretrain({str(prep)!r}, {str(run)!r}, resume={resume}, **{TINY!r})"
    return subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL,
                            stderr=open(log, 'a') if log else subprocess.DEVNULL)

def _wait(pred, timeout=120, what=''):
    t = time.time()
    while not pred():
        assert time.time() - t < timeout, f"timed out waiting for {what}"
        time.sleep(0.005)

def _mtime(p):
    try: return p.stat().st_mtime_ns
    except FileNotFoundError: return None

def test_sigkill_and_resume_give_identical_weights(prep, tmp_path):
    "Killed with SIGKILL twice (whenever the kills land) and resumed, a CPU run ends bit-identical to an uninterrupted one."
    ref, run, log = tmp_path/'ref', tmp_path/'killed', tmp_path/'log.txt'
    p = _start(prep, ref, log=log); assert p.wait() == 0, log.read_text()
    ck = run/'checkpoints'/'last.pt'
    p = _start(prep, run, log=log)
    _wait(lambda: ck.is_file() or p.poll() is not None, what='the first checkpoint')
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL, log.read_text()
    first = load_checkpoint(ck)['step']
    assert first < 21                                           # 3 epochs of 7 steps: killed mid-run
    p = _start(prep, run, resume=True, log=log)
    before = _mtime(ck)
    _wait(lambda: _mtime(ck) != before or p.poll() is not None, what='a checkpoint after resuming')
    time.sleep(random.uniform(0, 0.3)); p.send_signal(signal.SIGKILL); p.wait()
    p = _start(prep, run, resume=True, log=log); assert p.wait() == 0, log.read_text()
    a, b = load_checkpoint(ref/'checkpoints'/'last.pt'), load_checkpoint(ck)
    assert a['step'] == b['step'] == 21
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    for s, t in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(s['momentum_buffer'], t['momentum_buffer'])
    assert read_metrics(run).loss.tolist() == read_metrics(ref).loss.tolist()
    assert read_metrics(run).epoch.tolist() == [1, 2, 3]
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['last.pt']   # no temporary files left

DDP_SCRIPT = r'''
import json, os, sys, torch, torch.distributed as dist, torch.nn as nn
from freelunch.moco import MoCo, backbone, concat_all_gather, batch_shuffle, batch_unshuffle, infonce_loss
from freelunch.train import pretrain
prep, run, out = sys.argv[1:4]
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
res = dict(world=world)
res['gather'] = concat_all_gather(torch.full((3, 2), float(rank)))[:, 0].tolist()
x = torch.arange(8.).view(4, 2) + 100 * rank
mixed = False
for _ in range(5):
    xs, idx = batch_shuffle(x)
    res.setdefault('inverse', []).append(torch.equal(batch_unshuffle(xs, idx), x))
    mixed |= bool(((xs >= 100) != (x >= 100)).any())
res['mixed'] = mixed
torch.manual_seed(0)
model = MoCo(backbone('tiny'), K=16)
ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
torch.manual_seed(1 + rank)
logits, k = ddp(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
infonce_loss(logits).backward(); opt.step()
res['queue_has_both'] = torch.equal(model.queue.ordered()[-8:], concat_all_gather(k))
res['ptr'] = int(model.queue.ptr)
q_all = concat_all_gather(model.queue.keys[None])
res['queues_equal'] = torch.equal(q_all[0], q_all[1])
p_all = concat_all_gather(torch.cat([p.detach().flatten() for p in model.parameters()])[None])
res['params_equal'] = torch.equal(p_all[0], p_all[1])
writes = []
if rank:
    runp = os.path.realpath(run)
    def hook(event, args):
        if event in ('open', 'os.rename', 'os.replace', 'os.remove', 'os.mkdir', 'os.unlink') and args and \
           isinstance(args[0], (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(args[0])).startswith(runp):
            mode, flags = (args[1], args[2]) if event == 'open' else ('w', 0)
            if (mode and any(c in str(mode) for c in 'wax+')) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append([event, os.fsdecode(args[0])])
    sys.addaudithook(hook)
pretrain(prep, run, arch='tiny', size=32, epochs=2, batch=16, queue=64, workers=0, quiet=True, knn_frames=50)
res['writes'] = writes
with open(os.path.join(out, f'rank{rank}.json'), 'w') as f: json.dump(res, f)
dist.destroy_process_group()
'''

def test_ddp_two_processes_gloo(prep, tmp_path):
    "Two CPU processes under torchrun: gathering, shuffle-BN, a global queue, and only rank 0 writes the run."
    script, run = tmp_path/'ddp.py', tmp_path/'run'
    script.write_text(DDP_SCRIPT)
    torchrun(script, prep, run, tmp_path, timeout=300)
    res = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1)]
    for x in res:
        assert x['world'] == 2 and x['gather'] == [0, 0, 0, 1, 1, 1]
        assert all(x['inverse']) and x['mixed']            # unshuffle inverts; shuffling moves samples across ranks
        assert x['queue_has_both'] and x['ptr'] == 8       # keys of both ranks (4 + 4) enqueued, in rank order
        assert x['queues_equal'] and x['params_equal']
    assert res[1]['writes'] == [], res[1]['writes']          # rank 1 wrote nothing to the run folder
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['world_size'] == 2 and cfg['bn_splits'] == 1
    ck = load_checkpoint(run/'checkpoints'/'last.pt')
    assert ck['step'] == 2 * (60 // 16)                     # 3 global batches of 16 per epoch
    assert int(ck['model']['queue.ptr']) == (6 * 16) % 64   # the queue advanced by the global batch each step
    m = read_metrics(run)
    assert m.epoch.tolist() == [1, 2] and m.knn_top1.notna().all()
    assert sorted(p.name for p in run.iterdir()) == ['checkpoints', 'config.json', 'metrics.jsonl']

def test_data_loader_workers_do_not_change_the_result(prep, tmp_path):
    "Augmentations are seeded per item, so 0 or 2 data-loader workers train bit-identical weights."
    kw = {**TINY, 'epochs': 1, 'ckpt_every': None}
    a, b = (pretrain(prep, tmp_path/f'w{w}', **{**kw, 'workers': w}) for w in (0, 2))
    ca, cb = (load_checkpoint(r/'checkpoints'/'last.pt')['model'] for r in (a, b))
    for k in ca: assert torch.equal(ca[k], cb[k]), k

class Breaks(nn.Module):
    "The tiny ConvNet, whose features turn NaN from the 4th training forward pass on."
    def __init__(self): super().__init__(); self.f, self.out_dim, self.calls = tiny_convnet(), 64, 0
    def forward(self, x):
        if self.training and torch.is_grad_enabled(): self.calls += 1
        return self.f(x) * (float('nan') if self.calls > 3 else 1.)

def test_nan_loss_stops_and_keeps_last_good_checkpoint(prep, tmp_path):
    with pytest.raises(TrainingDiverged) as e: pretrain(prep, tmp_path/'run', **{**TINY, 'arch': Breaks}, bn_splits=1)
    msg = str(e.value)
    assert 'step 4: the loss became nan' in msg and '(step 3), is kept' in msg and '--resume' in msg
    ck = load_checkpoint(tmp_path/'run'/'checkpoints'/'last.pt')
    assert ck['step'] == 3
    assert all(v.isfinite().all() for v in ck['model'].values() if v.is_floating_point())
