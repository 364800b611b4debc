"`freelunch evaluate` end to end on hand-worked folders, its errors, and the evaluate benchmark."
import io, json, subprocess, sys
from contextlib import redirect_stdout, redirect_stderr
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
from freelunch.cli import main
from freelunch.data import write_phase_file, M2CAI16_PHASES
from freelunch.metrics import bench_evaluate, PROTOCOLS

BIN = str(Path(sys.executable).parent/'freelunch')

def fl(*args, ok=True):
    "Run `freelunch ARGS` in this process (the command's own start-up is tested once, below)."
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try: main([str(a) for a in args])
        except SystemExit as e: code = e.code
    r = SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    if not ok: assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr   # one clear line
    return r

# Rows at 0.2 fps (one every 125 frames of the 25 fps video), so the 10 s window is 2 rows.
# video41: phase 0 for 6 rows, then 1 for 4; the prediction changes 2 rows early (an early transition).
# video42: phases 0 and 2, predicted perfectly.
GT = {41: [0]*6 + [1]*4, 42: [0]*5 + [2]*5}
PRED = {41: [0]*4 + [1]*6, 42: [0]*5 + [2]*5}
STEP = 125

@pytest.fixture
def dirs(tmp_path):
    p, g = tmp_path/'pred', tmp_path/'gt'
    for v in GT:
        write_phase_file(g/f'video{v}-phase.txt', np.repeat(GT[v], STEP))          # 25 fps, as distributed
        write_phase_file(p/f'video{v}-phase.txt', PRED[v], step=STEP, names=v == 41)  # by name and by index
    return p, g

def run(p, g, protocol, *extra):
    return json.loads(fl('evaluate', p, g, '--fps', 0.2, '--protocol', protocol, '--json', *extra).stdout)

def test_command_starts_and_lists_evaluate(dirs):
    r = subprocess.run([BIN, 'evaluate', *dirs, '--fps', '0.2', '--protocol', 'strict'], capture_output=True, text=True)
    assert r.returncode == 0 and 'Accuracy' in r.stdout, r.stderr
    assert 'evaluate' in fl('--help').stdout
    h = fl('evaluate', '--help').stdout
    for opt in ('--fps', '--protocol', '--dataset', '--json', '--gt-fps', '--videos'): assert opt in h
    assert 'evaluate' in fl('bench', '--help').stdout

def test_strict_by_hand(dirs):
    r = run(*dirs, 'strict')
    s = r['summary']
    assert r['notes'] == ['ground truth subsampled from 25 to 0.2 fps (every 125th row)']
    assert r['per_video']['video41']['rows'] == 10
    # video41: 8 of 10 rows right; both phases TP 4, union 6 (J 66.7), F1 2*4/(4+6) = 80; video42 perfect
    assert s['accuracy']['mean'] == pytest.approx(90) and s['accuracy']['std'] == pytest.approx(np.std([80, 100], ddof=1))
    assert s['jaccard']['mean'] == pytest.approx((200/3 + 100) / 2) and s['jaccard']['across'] == 'videos'
    assert s['precision']['mean'] == pytest.approx(((100 + 200/3)/2 + 100) / 2)
    assert s['f1']['mean'] == pytest.approx(90)
    # segments: video41 predicted [0,4) [4,10) against [0,6) [6,10): IoU 4/6 each, so TP at 10/25/50 %
    assert s['f1@50'] == pytest.approx(100) and s['edit']['mean'] == pytest.approx(100)

def test_relaxed_forgives_and_clips(dirs):
    s = run(*dirs, 'relaxed')['summary']
    # both early rows are forgiven: TP 6 for phase 0 (P = 6/4 -> 100) and phase 1 (R = 6/4 -> 100)
    for k in ('accuracy', 'precision', 'recall', 'jaccard'): assert s[k]['mean'] == pytest.approx(100), k
    assert s['jaccard']['std'] == 0 and s['jaccard']['across'] == 'phases'

def test_legacy_matches_the_scripts(dirs):
    s = run(*dirs, 'legacy')['summary']
    # the end window is applied to the first 2 rows of phase 0, so the early rows stay wrong
    assert s['accuracy']['mean'] == pytest.approx(90)
    # per phase over videos: P = 100 (phase 0), 4/6 (phase 1), 100 (phase 2); nanmean over phases
    assert s['precision']['mean'] == pytest.approx(np.mean([100, 200/3, 100]))
    assert s['precision']['std'] == pytest.approx(np.std([100, 200/3, 100], ddof=1))
    # phases 3-6 are in no video: Main.m's plain `mean` makes Jaccard and Recall NaN (null in JSON)
    assert s['jaccard']['mean'] is None and s['recall']['mean'] is None

def test_text_report_and_out_file(dirs, tmp_path):
    r = fl('evaluate', *dirs, '--fps', 0.2, '--protocol', 'strict', '--out', tmp_path/'m'/'metrics.json').stdout
    assert 'protocol strict' in r and 'subsampled from 25 to 0.2 fps' in r and 'video42' in r
    assert 'GallbladderRetraction' in r and 'Accuracy' in r
    assert json.loads((tmp_path/'m'/'metrics.json').read_text()) == run(*dirs, 'strict')

def test_raw_cholec80_folder_and_videos(dirs, tmp_path):
    p, g = dirs
    (tmp_path/'raw').mkdir(); g.rename(tmp_path/'raw'/'phase_annotations')
    write_phase_file(tmp_path/'raw'/'phase_annotations'/'video01-phase.txt', np.repeat(GT[41], STEP))   # a training video
    err = fl('evaluate', p, tmp_path/'raw', '--fps', 0.2, '--protocol', 'strict', ok=False).stderr
    assert 'no prediction for video01' in err and '--videos' in err
    r = run(p, tmp_path/'raw', 'strict', '--videos', '41-80')
    assert r['videos'] == ['video41', 'video42']

def test_errors(dirs):
    p, g = dirs
    write_phase_file(p/'video41-phase.txt', PRED[41][:-1], step=STEP)
    err = fl('evaluate', p, g, '--fps', 0.2, '--protocol', 'legacy', ok=False).stderr
    assert 'video41: 9 prediction rows but 10 ground-truth rows' in err
    (p/'video41-phase.txt').write_text('Frame\tPhase\n0\tPreparation\n125\tCalot\n')
    err = fl('evaluate', p, g, '--fps', 0.2, '--protocol', 'legacy', ok=False).stderr
    assert "video41-phase.txt, line 3: unknown phase 'Calot'" in err
    write_phase_file(p/'video41-phase.txt', PRED[41], step=STEP)
    write_phase_file(p/'video43-phase.txt', PRED[41], step=STEP)
    err = fl('evaluate', p, g, '--fps', 0.2, '--protocol', 'strict', ok=False).stderr
    assert 'no ground truth for video43' in err
    (p/'video43-phase.txt').unlink(); (g/'video42-phase.txt').unlink()
    assert 'no ground truth for video42' in fl('evaluate', p, g, '--fps', 0.2, '--protocol', 'strict', ok=False).stderr

def test_wrong_fps_is_refused(dirs):
    # predictions numbered every 125 frames are at 0.2 fps: scoring them as 1 fps (or 25) would widen the window
    for f in (1, 25):
        err = fl('evaluate', *dirs, '--fps', f, '--protocol', 'legacy', ok=False).stderr
        assert 'that is 0.2 fps, but --fps is' in err and 'Give --fps 0.2' in err

def test_row_numbered_files_need_gt_fps(dirs, tmp_path):
    p, g = dirs
    q = tmp_path/'rows'
    for v in PRED: write_phase_file(q/f'video{v}-phase.txt', PRED[v])     # numbered 0, 1, 2: no rate in the file
    err = fl('evaluate', q, g, '--fps', 0.2, '--protocol', 'strict', ok=False).stderr
    assert '10 prediction rows but 1250 ground-truth rows' in err and 'add --gt-fps 25' in err
    assert run(q, g, 'strict', '--gt-fps', 25) == run(p, g, 'strict')

def test_m2cai16_names(tmp_path):
    p, g = tmp_path/'pred', tmp_path/'gt'
    y = [0]*3 + [1]*3 + [7]*2
    write_phase_file(g/'test_workflow_video_01.txt', np.repeat(y, 25), dataset='m2cai16')
    write_phase_file(p/'test_workflow_video_01.txt', y, dataset='m2cai16', step=25)
    r = json.loads(fl('evaluate', p, g, '--fps', 1, '--protocol', 'strict', '--dataset', 'm2cai16', '--json').stdout)
    assert r['per_phase']['phase'] == M2CAI16_PHASES and r['summary']['accuracy']['mean'] == 100
    assert r['per_phase']['videos'] == [1, 1, 0, 0, 0, 0, 0, 1]
    err = fl('evaluate', p, g, '--fps', 1, '--protocol', 'strict', ok=False).stderr
    assert "add --dataset m2cai16" in err

def test_bench_evaluate_is_fast():
    b = bench_evaluate(videos=40, fps=1, repeat=3, gt25=False)
    assert b['videos'] == 40 and b['rows'] > 40 * 15 * 60            # Cholec80-length videos at 1 fps
    for p in PROTOCOLS: assert b[f'{p}_s'] < 1.0, b                   # the target: 40 videos in under a second
    assert b['files_relaxed_s'] < 1.0, b
