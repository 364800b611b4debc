"""The documentation site: `_quarto.yml` for Quarto, and the offline build of tools/build_site.py.

The site is built once per set of sources into the test-artefacts folder ($FREELUNCH_ARTIFACTS, default
test-artifacts/) and shared with tests/test_browser.py. Notebooks are found when the tests run, so a new
chapter is checked as soon as it exists.
"""
import ast, functools, importlib.util, json, os, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
ARTIFACTS = Path(os.environ.get('FREELUNCH_ARTIFACTS') or ROOT/'test-artifacts')
NOTEBOOKS = sorted(p.name for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))

def _load_builder():
    spec = importlib.util.spec_from_file_location('build_site', ROOT/'tools'/'build_site.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

bs = _load_builder()

def built_site():
    "(site folder, manifest): the offline site of the current sources, built once for all test processes."
    out = ARTIFACTS/'site'
    return out, bs.cached_build(out, ROOT)

@pytest.fixture(scope='module')
def site(): return built_site()

@functools.lru_cache(maxsize=None)
def _parsed(path: str, mtime_ns: int):
    from bs4 import BeautifulSoup
    return BeautifulSoup(Path(path).read_text(encoding='utf-8'), 'html.parser')

def _soup(path):
    "The parsed page (parsed once per test process: some pages are megabytes of embedded figures); read only."
    return _parsed(str(path), Path(path).stat().st_mtime_ns)

def _cells(nb):
    return json.loads((NBS/nb).read_text(encoding='utf-8'))['cells']

def _src(c): return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

# --- the pieces, on hand-made inputs -----------------------------------------------------------------

def test_page_names_follow_nbdev():
    assert bs.page_name('00_core.ipynb') == 'core.html'
    assert bs.page_name('10_tcn.ipynb') == 'tcn.html'
    assert bs.page_name('index.ipynb') == 'index.html'
    assert bs.page_name('14a_extra_cli.ipynb') == 'extra_cli.html'

def test_sidebar_plan_expands_globs_and_braces(tmp_path):
    q = tmp_path/'_quarto.yml'
    q.write_text('website:\n  sidebar:\n    contents:\n      - index.ipynb\n      - section: A\n        contents: "0[0-1]_*.ipynb"\n'
                 '      - section: B\n        contents:\n          - "{02,1[01]}_*.ipynb"\n          - auto: "12_*.ipynb"\n'
                 '      - section: Empty\n        contents: "9*_*.ipynb"\n')
    names = ['00_a.ipynb', '01_b.ipynb', '02_c.ipynb', '10_d.ipynb', '11_e.ipynb', '12_f.ipynb', '13_g.ipynb', 'index.ipynb']
    plan, unlisted = bs.sidebar_plan(q, names)
    assert plan == [(None, ['index.ipynb']), ('A', ['00_a.ipynb', '01_b.ipynb']),
                    ('B', ['02_c.ipynb', '10_d.ipynb', '11_e.ipynb', '12_f.ipynb']), ('More', ['13_g.ipynb'])]
    assert unlisted == ['13_g.ipynb']
    q.write_text('website: [unclosed')
    with pytest.raises(bs.BuildError, match='not valid YAML'): bs.sidebar_plan(q, names)

def test_every_notebook_is_in_the_sidebar():
    "_quarto.yml's sidebar (the site Quarto builds) lists every notebook, the home page first."
    plan, unlisted = bs.sidebar_plan(ROOT/'_quarto.yml', NOTEBOOKS)
    assert unlisted == [], f"no sidebar entry of _quarto.yml matches {unlisted}: add them to website.sidebar.contents"
    assert plan[0] == (None, ['index.ipynb'])

def test_quarto_config_names_pages_and_repo():
    import yaml
    cfg = yaml.safe_load((ROOT/'_quarto.yml').read_text())
    assert cfg['project']['type'] == 'website'
    w = cfg['website']
    assert w['repo-url'].startswith('https://github.com/') and w['navbar']['right'][0]['href'] == w['repo-url']
    for it in w['navbar']['left']: assert (NBS/it['href']).exists(), f"navbar links to a missing {it['href']}"

def test_rewrite_href():
    pages = {'05_train': 'train.html', 'train.html': 'train.html', 'index': 'index.html', 'index.html': 'index.html'}
    blob = 'https://github.com/o/r/blob/main'
    f = lambda h: bs.rewrite_href(h, pages, 'https://o.github.io/r/', NBS, ROOT, blob)
    assert f('05_train.ipynb') == 'train.html'
    assert f('nbs/05_train.ipynb#the-loop') == 'train.html#the-loop'
    assert f('train.html#x') == 'train.html#x'
    assert f('https://o.github.io/r/train.html#pretrain') == 'train.html#pretrain'
    assert f('https://o.github.io/r/') == 'index.html'
    assert f('https://example.org/a.html') == 'https://example.org/a.html'
    assert f('#local') == '#local'
    assert f('../settings.ini') == f'{blob}/settings.ini'           # a file of the repository
    assert f('missing_chapter.ipynb') == 'missing_chapter.ipynb'    # left alone, so the link test sees it

def test_math_becomes_mathml_outside_code():
    store = []
    md = bs.extract_math('Loss $L_{con}$ costs \\$5, `$HOME` stays, and\n$$\\tau = 0.2$$\n```\n$x$\n```', store)
    assert len(store) == 2 and md.count('FLMATH') == 2
    assert '`$HOME`' in md and '\\$5' in md and '```\n$x$\n```' in md
    assert store[0].startswith('<math') and 'display="inline"' in store[0] and 'display="block"' in store[1]
    assert bs.extract_math('from 5$ to 6$ each', []) == 'from 5$ to 6$ each'

def test_pandoc_ids():
    assert bs.pandoc_id('FreelunchError') == 'freeluncherror'
    assert bs.pandoc_id('MoCo.forward') == 'moco.forward'
    assert bs.pandoc_id('InfoNCE (Eq. 2)') == 'infonce-eq.-2'
    assert bs.pandoc_id('1. Start here') == 'start-here'

# --- the site built from the notebooks ----------------------------------------------------------------

def test_every_chapter_has_a_page(site):
    out, m = site
    pages = {p['notebook']: p for p in m['pages']}
    assert sorted(pages) == NOTEBOOKS, "a notebook has no page: rebuild with python tools/build_site.py"
    order = [p['page'] for p in m['pages']]
    for nb, p in pages.items():
        s = _soup(out/p['page'])
        assert s.find('h1').get_text(strip=True) == p['title'] != '', nb
        assert [a['href'] for a in s.select('nav.site-sidebar a')] == order, f"{p['page']}: sidebar differs"
        assert s.select_one('nav.site-sidebar a[aria-current=page]')['href'] == p['page']
    assert (out/'index.html').exists()

def _images_in_notebook(nb):
    "Figures a reader should see: image outputs of cells that are neither hidden nor without output."
    n = 0
    for c in _cells(nb):
        src = _src(c)
        if c['cell_type'] != 'code' or re.search(r'^#\|\s*(hide|include:\s*false|output:\s*false)', src, re.M): continue
        n += sum(1 for o in c.get('outputs', []) if {'image/png', 'image/jpeg'} & set(o.get('data', {})))
    return n

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[Path(n).stem for n in NOTEBOOKS])
def test_figures_are_embedded(site, nb):
    out, m = site
    page = next(p for p in m['pages'] if p['notebook'] == nb)
    s = _soup(out/page['page'])
    srcs = [i.get('src', '') for i in s.find_all('img')]
    assert all(x.startswith('data:image/') for x in srcs), f"{page['page']}: an image is not embedded: {[x[:60] for x in srcs if not x.startswith('data:')]}"
    assert len(srcs) >= _images_in_notebook(nb), f"{page['page']}: {len(srcs)} figures, the notebook stores {_images_in_notebook(nb)}"

def _public_defs(mod_file):
    "Functions and classes a module defines at top level and lists in __all__ (nbdev's exports)."
    tree = ast.parse(mod_file.read_text(encoding='utf-8'))
    names = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and any(getattr(t, 'id', '') == '__all__' for t in n.targets)), [])
    defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return [x for x in names if x in defs]

def _module_of(nb):
    m = re.search(r'^#\|\s*default_exp\s+(\S+)', '\n'.join(_src(c) for c in _cells(nb) if c['cell_type'] == 'code'), re.M)
    return m and m.group(1)

@pytest.mark.parametrize('nb', [n for n in NOTEBOOKS if _module_of(n)], ids=lambda n: Path(n).stem)
def test_api_entries_are_present(site, nb):
    "Every exported function and class has its show_doc entry (a heading with the id nbdev links to)."
    out, m = site
    page = next(p for p in m['pages'] if p['notebook'] == nb)
    mod = ROOT/'freelunch'/(_module_of(nb).replace('.', '/') + '.py')
    if not mod.exists(): pytest.skip(f"{mod.name} is not exported yet")
    names = _public_defs(mod)
    missing = [n for n in names if bs.pandoc_id(n) not in page['api']]
    assert not missing, f"{page['page']} has no API entry for {missing} (exported from a #| hide cell?)"
    ids = {h.get('id') for h in _soup(out/page['page']).find_all(re.compile('^h[2-4]$'))}
    assert {bs.pandoc_id(n) for n in names} <= ids

def test_links_resolve_and_nothing_loads_from_outside(site):
    out, m = site
    ids = {p['page']: {t['id'] for t in _soup(out/p['page']).find_all(id=True)} for p in m['pages']}
    site_url = 'https://freelunch-ssl.github.io/freelunch'
    bad = []
    for p in m['pages']:
        s = _soup(out/p['page'])
        for tag, attr in (('script', 'src'), ('link', 'href'), ('img', 'src'), ('iframe', 'src')):
            for t in s.find_all(tag):
                v = t.get(attr, '')
                if re.match(r'(https?:)?//', v): bad.append(f"{p['page']}: <{tag}> loads {v} from outside")
                elif v and not v.startswith('data:') and not (out/v).exists(): bad.append(f"{p['page']}: <{tag}> {v} missing")
        for a in s.find_all('a', href=True):
            h = a['href']
            if h.startswith(site_url): bad.append(f"{p['page']}: {h} points at the published site")
            if re.match(r'[a-z]+:', h): continue
            path, _, frag = h.partition('#')
            target = path or p['page']
            if target not in ids: bad.append(f"{p['page']}: link to {h} (text {a.get_text(strip=True)[:40]!r}) leads nowhere"); continue
            if frag and frag not in ids[target]: bad.append(f"{p['page']}: {h}: {target} has no #{frag}")
    assert not bad, '\n'.join(bad)

def _stored_tables(nb):
    "HTML tables (a DataFrame's display) among the outputs of cells a reader sees."
    n = 0
    for c in _cells(nb):
        if c['cell_type'] != 'code' or re.search(r'^#\|\s*(hide|include:\s*false|output:\s*false)', _src(c), re.M): continue
        for o in c.get('outputs', []):
            h = o.get('data', {}).get('text/html', '')
            n += ('<table' in (''.join(h) if isinstance(h, list) else h))
    return n

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[Path(n).stem for n in NOTEBOOKS])
def test_outputs_render(site, nb):
    "Stored outputs show as what they are (tables as tables), never as the list of lines the file keeps them in."
    out, m = site
    page = next(p for p in m['pages'] if p['notebook'] == nb)
    s = _soup(out/page['page'])
    outs = s.select('.jp-OutputArea-output')
    as_lines = [o.get_text()[:60] for o in outs if re.match(r"\s*\[\s*'[^'\n]*\\n',", o.get_text())]
    assert not as_lines, f"{page['page']}: outputs shown as lists of lines: {as_lines[:3]}"
    tables = sum(1 for o in outs if o.get('data-mime-type') == 'text/html' and o.find('table'))
    assert tables >= _stored_tables(nb), f"{page['page']}: {tables} tables, the notebook stores {_stored_tables(nb)}"

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[Path(n).stem for n in NOTEBOOKS])
def test_hidden_cells_stay_hidden(site, nb):
    "`#| hide` cells, nbdev directives and the closing nbdev_export() never reach a page."
    out, m = site
    page = next(p for p in m['pages'] if p['notebook'] == nb)
    s = _soup(out/page['page'])
    shown = '\n'.join(x.get_text() for x in s.select('.jp-InputArea'))
    assert not re.search(r'^\s*#\|', shown, re.M), f"{page['page']} shows a #| directive"
    assert 'nbdev_export()' not in shown
    for c in _cells(nb):
        src = _src(c)
        if c['cell_type'] == 'code' and re.match(r'#\|\s*hide\s*$', src.split('\n')[0]):
            body = [l for l in src.splitlines()[1:] if l.strip()]
            if body: assert body[0].strip() not in shown, f"{page['page']} shows a hidden cell: {body[0]!r}"

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[Path(n).stem for n in NOTEBOOKS])
def test_nbdev_docs_can_process(site, nb):
    """`nbdev_docs` runs every cell that imports something, demos too, and stops at the first that fails
    (typically a NameError: the demo cells before it do not run). The offline build predicts those failures.
    Until the chapters are fixed this is an expected failure; FREELUNCH_STRICT_DOCS=1 makes it a failure."""
    out, m = site
    found = [x for x in m['errors'] if x.startswith(f'{nb}:')]
    if found and os.environ.get('FREELUNCH_STRICT_DOCS') != '1':
        pytest.xfail('nbdev_docs would stop here: ' + ' | '.join(found))
    assert not found, '\n'.join(found)

# The chapters where the paper's idea is: a course and a site that show them empty teach nothing.
FIGURE_CHAPTERS = {'04_moco.ipynb': 1, '06_zoo.ipynb': 1, '07_teacher.ipynb': 3, '08_distill.ipynb': 4,
                   '09_finetune.ipynb': 2, '10_tcn.ipynb': 2, '13_pipeline.ipynb': 1}

@pytest.mark.parametrize('nb', sorted(FIGURE_CHAPTERS), ids=lambda n: Path(n).stem)
def test_chapters_are_stored_with_their_figures(nb):
    "Each of these chapters is stored with the outputs of a run, figures included (UMAP views, curves, ribbons, rows)."
    assert _images_in_notebook(nb) >= FIGURE_CHAPTERS[nb], \
        f"{nb} stores {_images_in_notebook(nb)} figure(s): run it top to bottom and save it with its outputs"
