"The `freelunch` command end to end: synth, prepare, info, resuming, and the errors a user sees."
import json, signal, subprocess, time
from pathlib import Path
import numpy as np, pandas as pd
import pytest
from conftest import run_cli, FREELUNCH_BIN as BIN
from freelunch.data import read_phase_file, read_tool_file, CHOLEC80_TOOLS

TINY = ['--videos', '3', '--minutes', '0.3', '--seed', '1']
fl = run_cli

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp('cli')/'synth'
    fl('synth', out, *TINY)
    return out

def test_help_lists_subcommands():
    out = fl('--help').stdout
    for cmd in ('synth', 'prepare', 'info'):
        assert cmd in out
        assert fl(cmd, '--help').stdout.startswith(f'usage: freelunch {cmd}')

def test_synth_writes_raw_cholec80_layout(synth):
    vids = sorted(p.name for p in (synth/'videos').iterdir())
    assert vids == ['video01.mp4', 'video02.mp4', 'video03.mp4']
    for v in ('video01', 'video02', 'video03'):
        labels = read_phase_file(synth/'phase_annotations'/f'{v}-phase.txt')
        frames, tools = read_tool_file(synth/'tool_annotations'/f'{v}-tool.txt')
        assert len(frames) == -(-len(labels)//25)      # one tool row per started second
        assert np.all(np.diff(labels[labels < 4]) >= 0)  # phases 1-4 come in order
    assert not list(synth.rglob('*.tmp*'))

def test_synth_rerun_is_a_no_op(synth):
    before = {p: p.stat().st_mtime_ns for p in synth.rglob('*') if p.is_file()}
    t = time.time(); fl('synth', synth, *TINY)
    assert {p: p.stat().st_mtime_ns for p in synth.rglob('*') if p.is_file()} == before
    assert time.time() - t < 30

def test_prepare_and_info(synth, tmp_path):
    fl('prepare', synth, tmp_path/'prep', '--fps', 1, '--size', 64)
    df = pd.read_csv(tmp_path/'prep'/'index.csv')
    assert set(['video', 'split', 'frame', 'time', 'path', 'phase'] + CHOLEC80_TOOLS) <= set(df.columns)
    for v, g in df.groupby('video'):
        labels = read_phase_file(synth/'phase_annotations'/f'{v}-phase.txt')
        assert g.frame.tolist() == list(range(0, len(labels), 25))       # one frame per second
        assert (g.phase.values == labels[g.frame.values]).all()         # labels line up with 25 fps indices
        _, tools = read_tool_file(synth/'tool_annotations'/f'{v}-tool.txt')
        assert (g[CHOLEC80_TOOLS].values == tools[g.frame.values//25]).all()
    assert all((tmp_path/'prep'/p).is_file() for p in df.path)
    info = json.loads(fl('info', tmp_path/'prep', '--json').stdout)
    assert sum(info['frames'].values()) == len(df) and sum(info['videos'].values()) == 3
    raw = json.loads(fl('info', synth, '--json').stdout)
    assert raw['kind'] == 'raw' and raw['dataset'] == 'cholec80' and sum(raw['videos'].values()) == 3
    assert 'phases:' in fl('info', tmp_path/'prep').stdout

def test_prepare_resumes_after_sigkill(synth, tmp_path):
    "Killed at any moment, a rerun ends with the same index and frames as an uninterrupted run."
    args = ['prepare', synth, None, '--fps', 5, '--size', 48, '--workers', 1]
    args[2] = tmp_path/'ref'; fl(*args)
    out = args[2] = tmp_path/'killed'
    # kill once while the first frames are written, once after the first video is complete
    for ready in (lambda: any((out/'frames').rglob('*.jpg')), lambda: any((out/'parts').glob('*.csv'))):
        p = subprocess.Popen([BIN, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.time()
        while not ready() and p.poll() is None and time.time() - t < 60: time.sleep(0.01)
        p.send_signal(signal.SIGKILL); p.wait()
    assert not (out/'index.csv').exists(), "the run finished before it could be killed"
    fl(*args)
    ref, got = pd.read_csv(tmp_path/'ref'/'index.csv'), pd.read_csv(tmp_path/'killed'/'index.csv')
    pd.testing.assert_frame_equal(ref, got)
    files = sorted(p.relative_to(tmp_path/'killed') for p in (tmp_path/'killed'/'frames').rglob('*') if p.is_file())
    assert [str(f) for f in files] == sorted('/'.join(Path(p).parts) for p in ref.path)   # no leftovers, no duplicates

@pytest.mark.parametrize('make,args,msg', [
    (lambda d: d.mkdir(), ['prepare', '{d}', '{d}_out'], 'empty folder'),
    (lambda d: None, ['prepare', '{d}', '{d}_out'], 'no such folder'),
    (lambda d: (d.mkdir(), (d/'notes.txt').write_text('mine')), ['synth', '{d}', *TINY], 'not a SynthCholec folder'),
])
def test_errors_are_clear(tmp_path, make, args, msg):
    d = tmp_path/'x'; make(d)
    r = fl(*[a.format(d=d) for a in args], check=False)
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr

def test_prepare_refuses_a_folder_of_something_else(synth, tmp_path):
    (tmp_path/'out').mkdir(); (tmp_path/'out'/'thesis.tex').write_text('precious')
    r = fl('prepare', synth, tmp_path/'out', check=False)
    assert r.returncode == 2 and 'not a prepared folder' in r.stderr
    assert (tmp_path/'out'/'thesis.tex').read_text() == 'precious'

def test_missing_annotation_is_named(synth, tmp_path):
    import shutil
    raw = tmp_path/'raw'; shutil.copytree(synth, raw)
    (raw/'phase_annotations'/'video02-phase.txt').unlink()
    r = fl('prepare', raw, tmp_path/'out', check=False)
    assert r.returncode == 2 and 'videos without a phase annotation' in r.stderr and 'video02.mp4' in r.stderr

def test_pretrain_from_the_command_line(synth, tmp_path):
    "`freelunch pretrain` trains on the prepared frames, writes a checkpoint and metrics, and resumes."
    fl('prepare', synth, tmp_path/'prep', '--fps', 1, '--size', 32)
    args = ['pretrain', tmp_path/'prep', tmp_path/'run', '--arch', 'tiny', '--size', 32, '--batch', 8,
            '--queue', 32, '--epochs', 2, '--max-steps', 3]
    fl(*args)
    assert (tmp_path/'run'/'checkpoints'/'last.pt').is_file() and (tmp_path/'run'/'config.json').is_file()
    r = fl(*args[:-2], '--max-steps', 5, '--resume')
    assert 'run written to' in r.stdout

def test_synth_segmentation_clips(tmp_path):
    "--seg-clips/--seg-frames set the ground-truth clips; 0 clips writes none; a bad count is refused before writing."
    fl('synth', tmp_path/'s', '--videos', '1', '--minutes', '0.2', '--seg-clips', '2', '--seg-frames', '3')
    clips = sorted((tmp_path/'s'/'segmentation'/'video01').iterdir())
    assert len(clips) == 2 and all(len(list(c.glob('frame_*_endo.png'))) == 3 and (c/'tips.csv').is_file() for c in clips)
    fl('synth', tmp_path/'n', '--videos', '1', '--minutes', '0.2', '--seg-clips', '0')
    assert not list((tmp_path/'n').glob('segmentation/*/*'))
    r = fl('synth', tmp_path/'b', '--videos', '1', '--seg-frames', '0', check=False)
    assert r.returncode == 2 and 'seg_frames >= 1' in r.stderr, r.stderr
    assert not (tmp_path/'b').exists() or not any((tmp_path/'b').iterdir())
