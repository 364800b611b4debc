"""Checks in a real browser: the offline site, and a chapter run in JupyterLab.

Headless Chromium (Debian's `chromium`, or $FREELUNCH_CHROMIUM) driven by Playwright (`pip install
playwright`; `playwright install` is not needed). Without them these tests skip and say why; with
FREELUNCH_REQUIRE_BROWSER=1 (.ci/run sets it) they fail instead. Screenshots and logs go to
$FREELUNCH_ARTIFACTS/browser (default test-artifacts/browser).
"""
import importlib.util, json, os, re, secrets, shutil, signal, socket, subprocess, sys, threading, time
import urllib.request
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get('FREELUNCH_ARTIFACTS') or ROOT/'test-artifacts')
SHOTS = ARTIFACTS/'browser'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu']
LAB_CHAPTER = '03_augment.ipynb'   # quick, and shows progress bars, figures and a widget explorer

def _unavailable(reason):
    "Skip, or fail when FREELUNCH_REQUIRE_BROWSER=1 says these tests must run."
    if os.environ.get('FREELUNCH_REQUIRE_BROWSER') == '1':
        pytest.fail(f"{reason}; FREELUNCH_REQUIRE_BROWSER=1, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)

def chromium_path():
    for name in (os.environ.get('FREELUNCH_CHROMIUM'), 'chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        if name and shutil.which(name): return shutil.which(name)

@pytest.fixture(scope='module')
def browser():
    exe = chromium_path()
    if not exe: _unavailable("no Chromium found: install Debian's `chromium` (apt-get install chromium) or set FREELUNCH_CHROMIUM")
    try: from playwright.sync_api import sync_playwright
    except ImportError: _unavailable("Playwright is not installed: pip install playwright (its own browser download is not needed)")
    with sync_playwright() as p:
        try: b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        except Exception as e: _unavailable(f"{exe} does not start under Playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()

def _shot(page, name, **kw):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS/f'{name}.png'), **kw)

def _clear_shots(prefix):
    for f in SHOTS.glob(f'{prefix}*'): f.unlink()

# --- the offline site ----------------------------------------------------------------------------------

def _built_site():
    spec = importlib.util.spec_from_file_location('build_site', ROOT/'tools'/'build_site.py')
    bs = importlib.util.module_from_spec(spec); spec.loader.exec_module(bs)
    out = ARTIFACTS/'site'                          # the same build tests/test_site.py checks
    return out, bs.cached_build(out, ROOT)

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass

@contextmanager
def serve(folder):
    "A local web server for `folder`, on a free port; yields its base URL."
    srv = ThreadingHTTPServer(('127.0.0.1', 0), partial(_Quiet, directory=str(folder)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try: yield f'http://127.0.0.1:{srv.server_port}/'
    finally: srv.shutdown(); srv.server_close()

_JS_BROKEN_IMAGES = "() => Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))"
_JS_EMPTY_MATH = "() => Array.from(document.querySelectorAll('math')).filter(m => m.getBoundingClientRect().width === 0).length"

def test_site_in_chromium(browser):
    "Follow every chapter link of the sidebar: pages load, figures decode, equations render, nothing fails."
    site, m = _built_site()
    _clear_shots('site-')
    with serve(site) as base:
        ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
        page = ctx.new_page()
        problems, outside = [], []
        page.on('console', lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == 'error' else None)
        page.on('pageerror', lambda e: problems.append(f"script error: {e}"))
        page.on('requestfailed', lambda r: problems.append(f"request failed: {r.url[:100]} ({r.failure})"))
        def local_only(route):
            if route.request.url.startswith(base): return route.continue_()
            outside.append(route.request.url); route.abort()
        page.route('**/*', local_only)
        page.goto(base + 'index.html', wait_until='load')
        order = [p['page'] for p in m['pages']]
        assert [a.get_attribute('href') for a in page.locator('nav.site-sidebar a').all()] == order
        cross = None                                 # a link to an API entry on another page, tried below
        for p in m['pages']:
            stem = Path(p['page']).stem
            page.locator(f'nav.site-sidebar a[href="{p["page"]}"]').click()
            page.wait_for_url(base + p['page']); page.wait_for_load_state('load')
            assert page.locator('h1').first.inner_text().strip() == p['title']
            assert page.evaluate(_JS_BROKEN_IMAGES) == [], f"{p['page']}: images that do not load"
            assert page.evaluate('document.images.length') == p['images']
            assert page.evaluate(_JS_EMPTY_MATH) == 0, f"{p['page']}: an equation renders empty"
            _shot(page, f'site-{stem}')
            if p['images']:
                page.locator('main img').first.scroll_into_view_if_needed()
                _shot(page, f'site-{stem}-figure')
            if cross is None:
                hrefs = page.eval_on_selector_all('main a[href*=".html#"]', 'as => as.map(a => a.getAttribute("href"))')
                cross = next(((p['page'], h) for h in hrefs if not h.startswith(p['page'] + '#')), None)
        # the prev/next links walk the chapters in the sidebar's order
        page.goto(base + 'index.html', wait_until='load'); walked = ['index.html']
        while page.locator('a[rel=next]').count():
            page.locator('a[rel=next]').click(); page.wait_for_load_state('load')
            walked.append(page.url.rsplit('/', 1)[-1])
        assert walked == order
        if cross:                                    # an API link lands on its entry
            src, href = cross
            page.goto(base + src, wait_until='load')
            page.locator(f'main a[href="{href}"]').first.click()
            page.wait_for_url(base + href); page.wait_for_load_state('load')
            frag = href.split('#', 1)[1]
            top = page.evaluate(f"() => document.getElementById({json.dumps(frag)})?.getBoundingClientRect().top")
            assert top is not None and 0 <= top < 900, f"{href}: the entry is not where the link lands (top={top})"
            _shot(page, 'site-api-link')
        ctx.close()
    assert not outside, f"pages asked for outside resources: {outside[:5]}"
    assert not problems, '\n'.join(problems[:20])

# --- JupyterLab ------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _lab_settings(folder):
    "User settings: every cell in the page (no windowing), and no news or update checks (offline)."
    for rel, value in [('@jupyterlab/notebook-extension/tracker.jupyterlab-settings', {'windowingMode': 'none'}),
                       ('@jupyterlab/apputils-extension/notification.jupyterlab-settings',
                        {'fetchNews': 'false', 'checkForUpdates': False})]:
        f = folder/rel; f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(value))

@contextmanager
def jupyterlab(root_dir, work):
    "JupyterLab on localhost serving `root_dir`, with a random port and token; yields (url, token)."
    port, token = _free_port(), secrets.token_hex(16)
    _lab_settings(work/'settings')
    env = {k: v for k, v in os.environ.items() if k not in ('MPLBACKEND', 'IN_TEST', 'JUPYTER_CONFIG_PATH')}
    env.update(JUPYTER_CONFIG_DIR=str(work/'config'), JUPYTER_RUNTIME_DIR=str(work/'runtime'), IPYTHONDIR=str(work/'ipython'))
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ServerApp.ip=127.0.0.1',
           f'--ServerApp.port={port}', '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}',
           f'--ServerApp.root_dir={root_dir}', f'--LabApp.user_settings_dir={work/"settings"}',
           f'--LabApp.workspaces_dir={work/"workspaces"}']
    log_path = work/'jupyterlab.log'
    log = open(log_path, 'w')
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root_dir, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    tail = lambda: '\n'.join(log_path.read_text(errors='replace').splitlines()[-25:])
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None: pytest.fail(f"JupyterLab exited with code {proc.returncode}:\n{tail()}")
            try:
                with urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=3) as r:
                    if r.status == 200: break
            except OSError: pass
            if time.time() > deadline: pytest.fail(f"JupyterLab did not answer on {url} within 120 s:\n{tail()}")
            time.sleep(0.5)
        yield url, token
    finally:
        try: urllib.request.urlopen(urllib.request.Request(f'{url}/api/shutdown?token={token}', method='POST'), timeout=5)
        except OSError: pass                         # it shuts its kernels down; then make sure it is gone
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try: proc.wait(10)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()
        SHOTS.mkdir(parents=True, exist_ok=True); shutil.copy(log_path, SHOTS/'lab-server.log')

# The kernel's state as the status bar shows it ("Python 3 (ipykernel) | Idle"); the toolbar's execution
# indicator says "idle" before there is any kernel at all, and Run All then only asks which kernel to start.
_JS_KERNEL = """() => {
  const name = document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName')?.textContent.trim();
  const item = Array.from(document.querySelectorAll('.jp-StatusBar-TextItem')).map(e => e.textContent.trim())
                    .find(t => / \\| [A-Z][a-z]+$/.test(t));
  return (!name || name === 'No Kernel' || !item) ? 'none' : item.split(' | ').pop().toLowerCase();
}"""

_JS_LAB_STATE = """() => {
  const _kernelStatus = """ + _JS_KERNEL + """;
  const outs = Array.from(document.querySelectorAll('.jp-OutputArea-output'));
  return {
    prompts: Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).map(e => e.textContent.trim()),
    kernel: _kernelStatus(),
    images: Array.from(document.querySelectorAll('.jp-OutputArea-output img')).map(i => i.complete && i.naturalWidth > 0),
    progress: document.querySelectorAll('.jp-OutputArea-output .widget-hprogress, .jp-OutputArea-output .widget-progress').length,
    sliders: document.querySelectorAll('.jp-OutputArea-output .widget-slider').length,
    stderr: outs.filter(e => (e.getAttribute('data-mime-type') || '').includes('stderr')).map(e => e.textContent.slice(0, 300)),
    textbars: outs.map(e => e.textContent).filter(t => /\\d+%\\|/.test(t)).length,
  };
}"""

def _lab_menu(page, menu, command):
    page.locator('.lm-MenuBar-item', has_text=menu).first.click()
    page.locator(f'.lm-Menu-item[data-command="{command}"]').click()

def test_chapter_runs_in_jupyterlab(browser, tmp_path):
    "Open a chapter in JupyterLab, Run > Run All Cells, and look: figures, widgets, progress bars, no errors."
    import nbformat
    _clear_shots('lab-')
    root = tmp_path/'project'; (root/'nbs').mkdir(parents=True)
    shutil.copy(ROOT/'settings.ini', root)           # the chapter's closing nbdev_export() needs a project
    nb = nbformat.read(ROOT/'nbs'/LAB_CHAPTER, as_version=4)
    for c in nb.cells:                                # so whatever shows was made now, in this browser
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    nbformat.write(nb, root/'nbs'/LAB_CHAPTER)
    n_code = sum(c.cell_type == 'code' for c in nb.cells)
    with jupyterlab(root, tmp_path) as (url, token):
        ctx = browser.new_context(viewport={'width': 1400, 'height': 1000})
        page = ctx.new_page()
        console = []
        page.on('console', lambda msg: console.append(f"{msg.type}: {msg.text}"))
        page.on('pageerror', lambda e: console.append(f"script error: {e}"))
        try:
            page.goto(f'{url}/lab/tree/nbs/{LAB_CHAPTER}?token={token}')
            page.wait_for_function(f"() => document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell').length === {n_code}",
                                   timeout=120_000)
            page.wait_for_function(f"() => ({_JS_KERNEL})() === 'idle'", timeout=120_000)
            assert page.locator('.jp-Dialog').count() == 0, "JupyterLab asks something before the notebook can run"
            _shot(page, 'lab-opened')
            _lab_menu(page, 'Run', 'runmenu:run-all')
            deadline, st = time.time() + 300, {}
            while time.time() < deadline:
                st = page.evaluate(_JS_LAB_STATE)
                if st['kernel'] == 'idle' and st['prompts'] and all(re.fullmatch(r'\[\d+\]:', x) for x in st['prompts']): break
                time.sleep(1)
            else:
                _shot(page, 'lab-timeout')
                pytest.fail(f"the cells did not all run within 300 s: kernel {st.get('kernel')}, prompts {st.get('prompts')}")
            assert len(st['prompts']) == n_code
            _shot(page, 'lab-done')
            assert st['images'] and all(st['images']), f"figures missing or not decoded: {st['images']}"
            assert st['sliders'] >= 1, "the widget explorer did not render (ipywidgets in JupyterLab)"
            assert st['progress'] >= 1, "no progress bar widget: freelunch.core.progress should be a widget in JupyterLab"
            assert st['textbars'] == 0, "a progress bar printed as text in JupyterLab"
            assert not [s for s in st['stderr'] if 'Traceback' in s or 'Error' in s], st['stderr']
            for what, sel in (('progress', '.widget-hprogress'), ('figure', '.jp-OutputArea-output img'), ('widget', '.widget-slider')):
                page.locator(sel).first.scroll_into_view_if_needed(); _shot(page, f'lab-{what}')
            # the widget talks to the kernel: move a slider, the figure under it is drawn again
            out = page.locator('.jp-OutputArea-output:has(.widget-slider)').first
            before = out.locator('img').first.get_attribute('src')
            handle = out.locator('.widget-slider .noUi-handle').last
            handle.focus(); page.keyboard.press('ArrowRight')
            page.wait_for_function("([el, src]) => { const i = el.querySelector('img'); return i && i.src !== src && i.naturalWidth > 0 }",
                                   arg=[out.element_handle(), before], timeout=60_000)
            _shot(page, 'lab-widget-moved')
            _lab_menu(page, 'File', 'docmanager:save')
            page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30_000)
        finally:
            SHOTS.mkdir(parents=True, exist_ok=True)
            (SHOTS/'lab-console.log').write_text('\n'.join(console))
            ctx.close()
    saved = nbformat.read(root/'nbs'/LAB_CHAPTER, as_version=4)
    code = [c for c in saved.cells if c.cell_type == 'code']
    errors = [(c.source.splitlines()[0] if c.source else '', o.get('ename'), o.get('evalue'))
              for c in code for o in c.outputs if o.output_type == 'error']
    assert not errors, f"cells raised: {errors}"
    assert all(c.execution_count for c in code), "a cell did not run"
