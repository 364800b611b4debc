"""Build the documentation site offline, without Quarto.

`nbdev_docs` needs Quarto. This renders the same site from the same notebooks with what pip installs:
nbdev's own documentation processors (the ones `nbdev_docs` runs: `#| hide` cells dropped, `show_doc`
API entries added after exported functions, links to the API added) and nbconvert's HTML exporter.
The notebooks are NOT executed: they are stored with their outputs, and only the cells nbdev runs for
`show_doc` (imports and exported definitions) run, with IN_TEST=1. Figures are embedded as data URIs,
equations become MathML, pages get the names Quarto gives them (`00_core.ipynb` -> `core.html`), the
sidebar follows `_quarto.yml`, and links between chapters (`05_train.ipynb`, `train.html`, the site's
own URL) point at the pages built. Nothing on a page loads from the internet.

    python tools/build_site.py [--out build/site] [--jobs 2]

The folder is replaced whole when the build succeeds (built beside it, then renamed). `site.json` in it
lists the pages, their figures and API entries.
"""
from __future__ import annotations
import argparse, ast, fnmatch, hashlib, html, json, os, posixpath, re, shutil, sys, tempfile, time, warnings
from concurrent.futures import ProcessPoolExecutor
from configparser import ConfigParser
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT/'build'/'site'

class BuildError(Exception): "A notebook or the configuration cannot be rendered; the message says which and why."

# ---------------------------------------------------------------------------------------------------
# The plan: which notebooks, in which order and section, under which page name

def settings(root=ROOT) -> dict:
    "settings.ini's [DEFAULT] section."
    cfg = ConfigParser(delimiters=['=']); cfg.read(Path(root)/'settings.ini', encoding='utf-8')
    return dict(cfg['DEFAULT'])

def page_name(nb_name: str) -> str:
    "The page Quarto and nbdev give a notebook: numeric prefix dropped, lower case, `.html`."
    stem = re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(nb_name).name.lower())
    return str(Path(stem).with_suffix('.html'))

def chapter_notebooks(nbs: Path) -> list[str]:
    "Names of the notebooks in `nbs` that make pages (not `_`- or `.`-prefixed)."
    return sorted(p.name for p in Path(nbs).glob('*.ipynb') if not p.name.startswith(('_', '.')))

def _braces(pat: str) -> list[str]:
    "Expand the first `{a,b}` group of a glob (Quarto's globs have them, fnmatch has not), recursively."
    m = re.search(r'\{([^{}]*)\}', pat)
    if not m: return [pat]
    return [x for alt in m.group(1).split(',') for x in _braces(pat[:m.start()] + alt + pat[m.end():])]

def _matches(pattern: str, names: list[str]) -> list[str]:
    pats = [p.lstrip('/').removeprefix('./') for p in _braces(pattern)]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]

def _items(entry) -> list:
    "The file names or globs of one sidebar entry (a string, `{href|file: x}`, `{auto: glob}`)."
    if isinstance(entry, str): return [entry]
    if isinstance(entry, dict):
        for k in ('href', 'file', 'auto'):
            if isinstance(entry.get(k), str): return [entry[k]]
            if isinstance(entry.get(k), list): return entry[k]
    return []

def sidebar_plan(quarto_yml: Path, names: list[str]) -> tuple[list[tuple], list[str]]:
    "([(section or None, [notebook names])], notebooks no sidebar entry lists), in `_quarto.yml`'s order."
    import yaml
    try: cfg = yaml.safe_load(Path(quarto_yml).read_text(encoding='utf-8')) or {}
    except yaml.YAMLError as e: raise BuildError(f"{quarto_yml}: not valid YAML ({e}); fix the file.")
    sb = (cfg.get('website') or {}).get('sidebar') or {}
    if isinstance(sb, list): sb = sb[0] if sb else {}
    contents = sb.get('contents') or []
    if isinstance(contents, str): contents = [contents]
    used, plan = set(), []
    def take(entry):
        got = []
        for it in _items(entry):
            for n in _matches(it, names):
                if n not in used: used.add(n); got.append(n)
        return got
    for entry in contents:
        if isinstance(entry, dict) and 'section' in entry:
            sub = entry.get('contents') or []
            got = [n for e in ([sub] if isinstance(sub, str) else sub) for n in take(e)]
            got += take({'href': entry['href']}) if isinstance(entry.get('href'), str) else []
            if got: plan.append((str(entry['section']), got))
        else:
            got = take(entry)
            if got:
                if plan and plan[-1][0] is None: plan[-1][1].extend(got)
                else: plan.append((None, got))
    unlisted = [n for n in names if n not in used]
    if unlisted: plan.append(('More', unlisted))
    return plan, unlisted

# ---------------------------------------------------------------------------------------------------
# Markdown: equations to MathML, pandoc attribute blocks away

_CODE = re.compile(r'(```.*?```|~~~.*?~~~|``[^\n]*?``|`[^`\n]*`)', re.S)
_MATH = re.compile(r'\$\$(.+?)\$\$|(?<![\\$\w])\$(?=[^\s$])([^$\n]*?[^\s\\$])\$(?![\d$\w])', re.S)

def tex_to_mathml(tex: str, display: bool = False) -> str:
    "MathML for `tex` (latex2mathml); the TeX itself in a `<code>` when it cannot be converted."
    try:
        from latex2mathml.converter import convert
        return convert(tex.strip(), display='block' if display else 'inline').replace('\n', ' ')
    except Exception:
        return f'<code class="tex{" display" if display else ""}">{html.escape(tex.strip())}</code>'

def extract_math(md: str, store: list) -> str:
    "Replace `$...$` / `$$...$$` outside code by placeholders; their MathML is appended to `store`."
    def repl(m):
        display = m.group(1) is not None
        store.append(tex_to_mathml(m.group(1) if display else m.group(2), display))
        return f'FLMATH{len(store)-1:05d}Z'
    parts = _CODE.split(md)
    return ''.join(_MATH.sub(repl, p) if i % 2 == 0 else p for i, p in enumerate(parts))

_ATTRS = re.compile(r'(\]\([^)\s]*\))\{[^{}\n]*\}')
def strip_pandoc_attrs(md: str) -> str:
    "`[x](url){target=...}` -> `[x](url)`: nbdev writes pandoc attributes that only Quarto reads."
    return _ATTRS.sub(r'\1', md)

# ---------------------------------------------------------------------------------------------------
# One notebook: nbdev's processors, then nbconvert (runs in a worker process)

_WIDGET = 'application/vnd.jupyter.widget-view+json'
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{# Nothing from a CDN: no require.js, MathJax, Mermaid or widget manager. #}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""

def _directives(src: str) -> tuple[dict, str]:
    "Quarto cell options (`#| key: value`) of a processed code cell, and the source without them."
    opts, lines = {}, src.splitlines()
    while lines and lines[0].lstrip().startswith('#|'):
        k, _, v = lines.pop(0).lstrip()[2:].partition(':')
        opts[k.strip()] = v.strip().strip('"\'').lower()
    return opts, '\n'.join(lines).strip('\n')

def _prepare(nb: dict) -> tuple[dict, dict, list]:
    "Quarto's part of the job: front matter out, cell options honoured, equations set aside."
    fm, cells, math = {}, [], []
    for c in nb['cells']:
        src = c.get('source', '')
        if isinstance(src, list): src = ''.join(src)
        if c['cell_type'] == 'raw' and src.lstrip().startswith('---'):
            import yaml
            fm.update(yaml.safe_load(src.strip().strip('-')) or {}); continue
        if c['cell_type'] == 'markdown':
            c['source'] = extract_math(strip_pandoc_attrs(src), math)
        elif c['cell_type'] == 'code':
            opts, c['source'] = _directives(src)
            if opts.get('include') == 'false': continue
            tags = set(c.setdefault('metadata', {}).get('tags', []))
            if opts.get('echo') == 'false' or not c['source'].strip(): tags.add('remove-input')
            if opts.get('output') == 'false': tags.add('remove-output')
            c['metadata']['tags'] = sorted(tags)
            outs = []
            for o in c.get('outputs', []):
                data = o.get('data', {})
                if 'text/markdown' in data:
                    md = data['text/markdown']; md = ''.join(md) if isinstance(md, list) else md
                    data['text/markdown'] = strip_pandoc_attrs(md)
                if _WIDGET in data:   # no widget manager offline: say so instead of a bare repr
                    o = {'output_type': 'display_data', 'metadata': {}, 'data': {'text/html':
                         '<div class="widget-placeholder">An interactive widget: run this notebook in '
                         'Jupyter to use it.</div>'}}
                outs.append(o)
            if 'outputs' in c: c['outputs'] = outs
            if not c['source'].strip() and not outs: continue
        cells.append(c)
    nb['cells'] = cells
    nb['metadata'].pop('widgets', None)
    return nb, fm, math

def _mixed_imports(cell):
    "None for a cell nbdev's exec_show_docs treats as usual, else the import statements of a cell that mixes them with other work."
    import ast
    from nbdev.processors import _do_eval, _show_docs
    if cell.cell_type != 'code' or not cell.source or not _do_eval(cell): return None
    if cell.directives_.keys() & {'export', 'exports', 'exporti', 'exec_doc'}: return None
    trees = cell.parsed_()
    if not trees or _show_docs(trees): return None
    imports = [t for t in trees if isinstance(t, (ast.Import, ast.ImportFrom))]
    defs = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    if all(isinstance(t, defs) for t in trees): return None      # imports and definitions: cheap, run as nbdev does
    return '\n'.join(ast.unparse(t) for t in imports)

_IPY_NAMES = {'display', 'get_ipython', 'In', 'Out', 'exit', 'quit', '_', '__', '___'}

def _names(trees) -> tuple[set, set]:
    """(names read, names bound) when statements `trees` run at top level: function bodies and lambdas
    do not run then, their defaults and decorators do. A star import binds everything (`*`)."""
    loads, stores = set(), set()
    class V(ast.NodeVisitor):
        def visit_Name(self, n): (loads if isinstance(n.ctx, ast.Load) else stores).add(n.id)
        def _func(self, n):
            stores.add(n.name)
            for d in n.decorator_list + n.args.defaults + [x for x in n.args.kw_defaults if x]: self.visit(d)
        visit_FunctionDef = visit_AsyncFunctionDef = _func
        def visit_Lambda(self, n):
            for d in n.args.defaults + [x for x in n.args.kw_defaults if x]: self.visit(d)
        def visit_ClassDef(self, n): stores.add(n.name); self.generic_visit(n)
        def visit_Import(self, n): stores.update((a.asname or a.name).split('.')[0] for a in n.names)
        def visit_ImportFrom(self, n): stores.update(a.asname or a.name for a in n.names)
        def visit_ExceptHandler(self, n):
            if n.name: stores.add(n.name)
            self.generic_visit(n)
        def visit_arg(self, n): stores.add(n.arg)
    for t in trees or []: V().visit(t)
    if '*' in stores: loads.clear()
    return loads, stores

def _exporter():
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {'remove-input'}
    c.TagRemovePreprocessor.remove_all_outputs_tags = {'remove-output'}
    return HTMLExporter(config=c, template_name='lab', extra_loaders=[DictLoader({'site.html.j2': _TEMPLATE})],
                        template_file='site.html.j2', exclude_input_prompt=True, exclude_output_prompt=True,
                        embed_images=True)

def render_notebook(nb_path: str, root: str = str(ROOT)) -> dict:
    "nbdev's doc processors then nbconvert on one notebook: {title, description, html, notes} or {error}."
    try: return _render(nb_path, root)
    except BuildError as e: return dict(error=str(e))
    except Exception as e: return dict(error=f"{Path(nb_path).name}: {type(e).__name__}: {e}")

def _render(nb_path: str, root: str) -> dict:
    os.chdir(root)                                   # nbdev finds settings.ini from the working folder
    os.environ['IN_TEST'] = '1'; os.environ.setdefault('MPLBACKEND', 'Agg')
    import nbformat
    from execnb.nbio import read_nb, nb2dict
    from nbdev.processors import FilterDefaults
    from nbdev.processors import exec_show_docs
    import builtins
    name, errors, mixed, ran_whole = Path(nb_path).name, [], [], set()

    def first_line(cell):
        return next((l for l in cell.source.splitlines() if l.strip() and not l.startswith('#|')), '').strip()[:70]

    class exec_show_docs_imports(exec_show_docs):
        """nbdev's exec_show_docs, but a cell that imports AND does other work (a demo, a training run) runs
        only its imports. nbdev runs such a cell whole (it warns: "See FAQ") and stops the build at the first
        that fails; here each one is noted in `mixed`, and a failing cell in `errors`, and the build goes on."""
        def __call__(self, cell):
            src = _mixed_imports(cell)
            try:
                if src is None: return super().__call__(cell)
                if not self.nb.has_docs_ or not hasattr(self, 'k'): return
                mixed.append(f"{name}: the cell starting `{first_line(cell)}` imports and does other work: "
                             f"nbdev_docs runs such a cell whole when it builds the docs (slowly, and it stops at the "
                             f"first one that fails): give its imports a cell of their own.")
                if src: self.k.run(src)
                if self.k.exc: raise self.k.exc
                loads, stores = _names(cell.parsed_())
                known = set(self.k.user_ns) | set(dir(builtins)) | ran_whole | _IPY_NAMES
                free = sorted(loads - stores - known)
                if free: raise NameError(f"name {free[0]!r} is not defined (nbdev would run this cell without the "
                                         f"demo cells before it)")
                ran_whole.update(stores)             # nbdev ran it whole: what it defines exists from here on
            except Exception as e:
                self.k.exc = None                   # else every later cell reports the same error
                err = e.__cause__ or e
                errors.append(f"{name}: nbdev_docs stops at the cell starting `{first_line(cell)}`: "
                              f"{type(err).__name__}: {err}")

    class Procs(FilterDefaults):
        def base_procs(self): return [exec_show_docs_imports if p is exec_show_docs else p for p in super().base_procs()]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            nb = read_nb(nb_path); Procs()(nb)
        except Exception as e:
            cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ''
            raise BuildError(f"{name}: nbdev's processing failed: {e}{cause}") from None
    notes = sorted({str(w.message).strip().splitlines()[0] for w in caught})
    notes = [f"{name}: {m}" if 'FAQ' in m else m for m in notes]
    nb, fm, math = _prepare(json.loads(json.dumps(nb2dict(nb))))
    nb = nbformat.v4.rwbase.rejoin_lines(nbformat.from_dict(nb))   # outputs as stored: lists of lines
    try: body, _ = _exporter().from_notebook_node(nb, resources={'metadata': {'name': Path(nb_path).stem}})
    except Exception as e: raise BuildError(f"{name}: nbconvert could not render it: {type(e).__name__}: {e}") from None
    for i, m in enumerate(math): body = body.replace(f'FLMATH{i:05d}Z', m)
    return dict(title=str(fm.get('title') or Path(nb_path).stem), description=str(fm.get('description') or ''),
                html=body, notes=notes, errors=errors, mixed=mixed)

# ---------------------------------------------------------------------------------------------------
# The site: ids as pandoc makes them, links rewritten, navigation added

def pandoc_id(text: str) -> str:
    "The id pandoc (so Quarto, so nbdev's API links) gives a heading: `MoCo.forward` -> `moco.forward`."
    s = re.sub(r'[^\w\s.-]', '', text.strip().lower())
    s = re.sub(r'\s+', '-', s)
    s = re.sub(r'^[\W\d_.-]+', '', s)
    return s or 'section'

def rewrite_href(href: str, pages: dict, site_url: str, nb_dir: Path, root: Path, repo_blob: str) -> str:
    """A link as the offline site needs it.

    `pages` maps notebook stems and page names to pages. Links to a chapter (`05_train.ipynb`,
    `nbs/05_train.ipynb`, `train.html`, `{site_url}/train.html`) go to the page built; a relative link
    to another file of the repository goes to that file on the repository's site; the rest is left.
    """
    if not href or href.startswith(('#', 'mailto:', 'data:', 'javascript:')): return href
    if site_url and href.startswith(site_url):
        rest = href[len(site_url):].lstrip('/')
        return rewrite_href(rest or 'index.html', pages, '', nb_dir, root, repo_blob)
    u = urlsplit(href)
    if u.scheme or u.netloc: return href
    frag = f'#{u.fragment}' if u.fragment else ''
    base = posixpath.basename(u.path)
    stem, ext = posixpath.splitext(base)
    if ext == '.ipynb' and stem in pages: return pages[stem] + frag
    if ext in ('.html', '.htm') and base in pages: return pages[base] + frag
    if u.path and not u.path.startswith('/'):
        for d in (nb_dir, root):
            p = (d/u.path).resolve()
            if p.exists() and root in p.parents: return f"{repo_blob}/{p.relative_to(root).as_posix()}{frag}"
    return href

_CSS = """
:root { --site-primary: #2780e3; --site-sidebar: 17rem; }
html { scroll-padding-top: 4rem; }
body.site { margin: 0; padding: 0 !important; }
.site-navbar { position: sticky; top: 0; z-index: 10; display: flex; align-items: center; gap: 1.5rem;
  background: var(--site-primary); color: #fff; padding: .6rem 1.2rem; font-family: system-ui, sans-serif; }
.site-navbar a { color: #fff; text-decoration: none; }
.site-navbar a:hover { text-decoration: underline; }
.site-navbar .site-title { font-weight: 600; font-size: 1.2rem; margin-right: 1rem; }
.site-navbar .site-right { margin-left: auto; }
.site-layout { display: flex; align-items: flex-start; }
.site-sidebar { position: sticky; top: 3rem; flex: 0 0 var(--site-sidebar); max-height: calc(100vh - 3rem);
  overflow-y: auto; box-sizing: border-box; padding: 1rem 1rem 2rem 1.2rem; font-family: system-ui, sans-serif;
  font-size: .92rem; border-right: 1px solid #e5e5e5; }
.site-sidebar ul { list-style: none; padding-left: 0; margin: 0; }
.site-sidebar li { margin: .15rem 0; }
.site-sidebar .site-section > span { display: block; margin-top: .9rem; font-weight: 600; color: #343a40; }
.site-sidebar .site-section ul { padding-left: .6rem; }
.site-sidebar a { color: #495057; text-decoration: none; }
.site-sidebar a:hover { color: var(--site-primary); }
.site-sidebar a[aria-current="page"] { color: var(--site-primary); font-weight: 600; }
main.site-main { flex: 1 1 auto; min-width: 0; max-width: 62rem; padding: 1rem 2rem 3rem; }
.page-header { font-family: system-ui, sans-serif; }
.page-header h1 { margin: .5rem 0 .3rem; font-size: 2.2rem; }
.jp-RenderedMarkdown pre, .jp-RenderedHTMLCommon pre { background: #f7f7f9; border-radius: 4px; padding: .5rem .7rem; }
.jp-RenderedHTMLCommon a code, .jp-RenderedHTMLCommon a { color: var(--site-primary); }
.jp-Cell-inputWrapper .jp-InputArea-editor { background: #f7f7f9; border-radius: 4px; }
.page-header .description { color: #6c757d; font-size: 1.15rem; margin: 0 0 1.5rem; }
.page-nav { display: flex; justify-content: space-between; border-top: 1px solid #e5e5e5;
  margin-top: 2.5rem; padding-top: 1rem; font-family: system-ui, sans-serif; }
.page-nav a { color: var(--site-primary); text-decoration: none; }
.page-footer { color: #6c757d; font-size: .85rem; margin-top: 1.5rem; font-family: system-ui, sans-serif; }
.page-footer a { color: inherit; }
a.source-link { float: right; font-size: smaller; }
.widget-placeholder { font-style: italic; color: #6c757d; border: 1px dashed #ced4da; padding: .4rem .6rem; }
math[display="block"] { margin: .8rem 0; font-size: 1.15em; }
@media (max-width: 800px) {
  .site-layout { display: block; }
  .site-sidebar { position: static; max-height: none; border-right: 0; border-bottom: 1px solid #e5e5e5; }
  main.site-main { padding: 1rem; }
}
"""

def _nav_html(plan, titles, pages, current=None) -> str:
    def link(nb):
        cur = ' aria-current="page"' if nb == current else ''
        return f'<li><a href="{pages[nb]}"{cur}>{html.escape(titles[nb])}</a></li>'
    out = []
    for section, nbs in plan:
        items = ''.join(link(n) for n in nbs)
        out.append(items if section is None else
                   f'<li class="site-section"><span>{html.escape(section)}</span><ul>{items}</ul></li>')
    return f'<nav class="site-sidebar" aria-label="Chapters"><ul>{"".join(out)}</ul></nav>'

def _navbar_html(cfg, site_title, fix) -> str:
    nav = ((cfg.get('website') or {}).get('navbar') or {})
    def items(side):
        res = []
        for it in nav.get(side) or []:
            if not isinstance(it, dict) or not it.get('href'): continue
            text = it.get('text') or it.get('aria-label') or it.get('icon', '').title() or it['href']
            res.append(f'<a href="{html.escape(fix(it["href"]))}">{html.escape(str(text))}</a>')
        return ''.join(res)
    return (f'<header class="site-navbar"><a class="site-title" href="index.html">{html.escape(site_title)}</a>'
            f'{items("left")}<span class="site-right">{items("right")}</span></header>')

def _finish_page(raw: str, nb: str, info: dict, ctx: dict) -> tuple:
    "Turn nbconvert's page into a site page (a soup); also returns what the manifest says about it."
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(raw, 'html.parser')
    main = soup.find('main') or soup.body
    # headings: pandoc's ids (what nbdev's API links use); show_doc entries (headings in a cell's markdown
    # output) choose first, so `#segments` is the function even under a section called "Segments".
    heads = main.find_all(re.compile(r'^h[1-6]$'))
    def is_api(h):
        out = h.find_parent(class_='jp-OutputArea-output')
        return out is not None and out.get('data-mime-type') == 'text/markdown' and h.name in ('h2', 'h3', 'h4')
    seen, api, old_ids = set(), [], {}
    for h in sorted(heads, key=lambda h: not is_api(h)):
        for a in h.find_all('a', class_='anchor-link'): a.extract()
        new = base = pandoc_id(h.get_text(' ', strip=True)); k = 0
        while new in seen: k += 1; new = f'{base}-{k}'
        seen.add(new)
        if h.get('id') and h['id'] != new: old_ids[h['id']] = h
        h['id'] = new
        anchor = soup.new_tag('a', href=f'#{new}', attrs={'class': 'anchor-link'}); anchor.string = '¶'
        h.append(anchor)
        if is_api(h): api.append(new)
    for old, h in old_ids.items():                   # Jupyter's ids (`#Progress-bars`) still lead there
        if old not in seen: seen.add(old); h.insert(0, soup.new_tag('span', id=old))
    api = [h['id'] for h in heads if h['id'] in set(api)]
    # links
    for a in soup.find_all('a', href=True):
        if ctx['site_url'] and a['href'].startswith(ctx['site_url']): a['data-autolink'] = ''   # nbdev's API link
        a['href'] = ctx['fix'](a['href'])
        if a.get_text(strip=True) == 'source' and a['href'].startswith(ctx['repo_blob']): a['class'] = ['source-link']
    images = len([i for i in main.find_all('img') if str(i.get('src', '')).startswith('data:image/')])
    # page chrome
    title = info['title']
    if soup.title: soup.title.string = title if nb == 'index.ipynb' else f"{title} – {ctx['site_title']}"
    for s in soup.head.find_all('style'): s.extract()
    soup.head.append(soup.new_tag('link', rel='icon', href='data:,'))      # no favicon request to fail
    soup.head.append(soup.new_tag('link', rel='stylesheet', href=ctx['css']))
    soup.head.append(soup.new_tag('link', rel='stylesheet', href='site.css'))
    if info['description']:
        soup.head.append(soup.new_tag('meta', attrs={'name': 'description', 'content': info['description']}))
    header = BeautifulSoup(f'<header class="page-header"><h1 class="title">{html.escape(title)}</h1>'
                           + (f'<p class="description">{html.escape(info["description"])}</p>' if info['description'] else '')
                           + '</header>', 'html.parser')
    main.insert(0, header)
    i = ctx['order'].index(nb)
    prev_nb = ctx['order'][i-1] if i > 0 else None
    next_nb = ctx['order'][i+1] if i+1 < len(ctx['order']) else None
    pn = '<nav class="page-nav">' + (f'<a rel="prev" href="{ctx["pages"][prev_nb]}">← {html.escape(ctx["titles"][prev_nb])}</a>' if prev_nb else '<span></span>') \
         + (f'<a rel="next" href="{ctx["pages"][next_nb]}">{html.escape(ctx["titles"][next_nb])} →</a>' if next_nb else '<span></span>') + '</nav>'
    foot = (f'<footer class="page-footer">Rendered from <a href="{ctx["repo_blob"]}/{ctx["nbs_rel"]}/{nb}">'
            f'{ctx["nbs_rel"]}/{nb}</a> with its stored outputs. Open the notebook in Jupyter to run it.</footer>')
    main.append(BeautifulSoup(pn + foot, 'html.parser'))
    main['class'] = (main.get('class') or []) + ['site-main']
    layout = soup.new_tag('div', attrs={'class': 'site-layout'})
    main.wrap(layout)
    layout.insert(0, BeautifulSoup(_nav_html(ctx['plan'], ctx['titles'], ctx['pages'], nb), 'html.parser'))
    soup.body.insert(0, BeautifulSoup(ctx['navbar'], 'html.parser'))
    soup.body['class'] = (soup.body.get('class') or []) + ['site']
    return soup, dict(notebook=nb, page=ctx['pages'][nb], title=title, images=images, api=api)

def _fix_api_links(soups: dict, notes: list):
    """nbdev links every backticked name its index knows, private ones and methods too, to `page#name`;
    where that page has no such entry, link the class (`#cls` for `Cls.meth`) or leave plain code."""
    ids = {page: {t['id'] for t in s.find_all(id=True)} for page, s in soups.items()}
    for page, s in soups.items():
        for a in s.find_all('a', attrs={'data-autolink': True}):
            del a['data-autolink']
            path, _, frag = a['href'].partition('#')
            if not frag or path not in ids or frag in ids[path]: continue
            cls = frag.split('.')[0]
            if '.' in frag and cls in ids[path]: a['href'] = f'{path}#{cls}'; continue
            notes.append(f"{page}: `{a.get_text(strip=True)}` has no API entry on {path}: shown without a link")
            a.unwrap()

def _worker_task():
    """`render_notebook` as the module `build_site`, importable by name in the workers. They find their task
    by module name, and nbdev's IPython shell (it runs the show_doc cells) replaces `sys.modules['__main__']`
    in them, so neither a script's `__main__` nor a module loaded from its path without a name will do."""
    import importlib
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path: sys.path.insert(0, here)     # spawned workers start with the parent's sys.path
    return importlib.import_module('build_site').render_notebook

def _styles(raw: str) -> str:
    return '\n'.join(m for m in re.findall(r'<style[^>]*>(.*?)</style>', raw.split('</head>')[0], re.S))

def build(out=DEFAULT_OUT, root=ROOT, jobs: int = None, log=print) -> dict:
    "Render every chapter of `root`/nbs into `out` (replaced when done); returns the manifest."
    root, out = Path(root).resolve(), Path(out).resolve()
    t0 = time.time()
    st = settings(root)
    nbs = root/st.get('nbs_path', 'nbs')
    names = chapter_notebooks(nbs)
    if not names: raise BuildError(f"no notebooks in {nbs}")
    qy = root/'_quarto.yml' if (root/'_quarto.yml').exists() else nbs/'_quarto.yml'
    plan, unlisted = sidebar_plan(qy, names)
    order = [n for _, ns in plan for n in ns]
    pages = {Path(n).stem: page_name(n) for n in names}
    pages.update({p: p for p in pages.values()})
    nb_pages = {n: page_name(n) for n in names}
    clash = {p for p in nb_pages.values() if list(nb_pages.values()).count(p) > 1}
    if clash: raise BuildError(f"two notebooks make the same page {sorted(clash)}: rename one of them")
    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(names)))
    log(f"rendering {len(names)} notebooks from {nbs} with {jobs} worker(s)")
    with ProcessPoolExecutor(jobs, mp_context=get_context('spawn')) as ex:
        futs = {n: ex.submit(_worker_task(), str(nbs/n), str(root)) for n in order}
        done = {}
        for n, f in futs.items():
            done[n] = f.result()
            if 'error' in done[n]:
                for g in futs.values(): g.cancel()
                raise BuildError(done[n]['error'])
            log(f"  {n} -> {nb_pages[n]}")
    import yaml
    qcfg = yaml.safe_load(qy.read_text(encoding='utf-8')) or {}
    site_url = (st['doc_host'] + st.get('doc_baseurl', '')).rstrip('/') + '/' if st.get('doc_host') else ''
    git_url = ((qcfg.get('website') or {}).get('repo-url') or st.get('git_url', '')).rstrip('/')
    repo_blob = f"{git_url}/blob/{st.get('branch', 'main')}"
    site_title = str((qcfg.get('website') or {}).get('title') or st.get('title') or st.get('lib_name', ''))
    fix_for = lambda nb_dir: (lambda h: rewrite_href(h, pages, site_url, nb_dir, root, repo_blob))
    css = _styles(done[order[0]]['html'])
    css_name = f"notebook-{hashlib.sha256(css.encode()).hexdigest()[:10]}.css"
    titles = {n: done[n]['title'] for n in order}
    ctx = dict(plan=plan, order=order, pages=nb_pages, titles=titles, site_title=site_title, css=css_name, site_url=site_url,
               repo_blob=repo_blob, nbs_rel=nbs.relative_to(root).as_posix(), fix=fix_for(nbs))
    ctx['navbar'] = _navbar_html(qcfg, site_title, ctx['fix'])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
    try:
        (tmp/css_name).write_text(css, encoding='utf-8')
        (tmp/'site.css').write_text(_CSS, encoding='utf-8')
        extra = nbs/'styles.css'
        if extra.exists(): (tmp/'site.css').write_text(_CSS + '\n/* nbs/styles.css */\n' + extra.read_text(), encoding='utf-8')
        entries, soups = [], {}
        for n in order:
            soups[nb_pages[n]], entry = _finish_page(done[n]['html'], n, done[n], ctx)
            if _styles(done[n]['html']) != css: raise BuildError(f"{n}: nbconvert gave it other styles than the rest")
            entry['section'] = next(s for s, ns in plan if n in ns)
            entries.append(entry)
        notes = list(dict.fromkeys(x for n in order for x in done[n]['notes']))
        _fix_api_links(soups, notes)
        for page, soup in soups.items(): (tmp/page).write_text(str(soup), encoding='utf-8')
        errors = [x for n in order for x in done[n]['errors']]
        mixed = [x for n in order for x in done[n]['mixed']]
        manifest = dict(title=site_title, pages=entries, unlisted=unlisted, errors=errors, mixed_cells=mixed, notes=notes,
                        seconds=round(time.time() - t0, 1))
        (tmp/'site.json').write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding='utf-8')
        os.chmod(tmp, 0o755)
        old = None
        if out.exists(): old = out.with_name(f'.{out.name}.old-{os.getpid()}'); out.rename(old)
        tmp.rename(out)
        if old: shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True); raise
    for x in notes: log(f"note: {x}")
    for x in mixed: log(f"warning: {x}")
    for x in errors: log(f"ERROR: {x}")
    if unlisted: log(f"note: {unlisted} match no sidebar entry of {qy.name}: listed under 'More'")
    log(f"wrote {len(entries)} pages to {out} in {manifest['seconds']} s; open {out/'index.html'}")
    return manifest

# ---------------------------------------------------------------------------------------------------
# A cached build for the tests: several test processes share one build of the same sources

def source_key(root=ROOT) -> str:
    "A hash of everything the site is made from."
    root = Path(root); h = hashlib.sha256()
    files = sorted([*(root/'nbs').glob('*.ipynb'), *(root/'freelunch').glob('*.py'), root/'_quarto.yml',
                    root/'settings.ini', root/'nbs'/'styles.css', Path(__file__).resolve()])
    for f in files:
        if f.is_file(): h.update(f.name.encode()); h.update(f.read_bytes())
    return h.hexdigest()[:16]

def cached_build(out: Path, root=ROOT, log=lambda s: None) -> dict:
    "The manifest of a site in `out` built from the current sources; builds it (once, under a lock) if needed."
    out = Path(out); out.parent.mkdir(parents=True, exist_ok=True)
    key = source_key(root)
    with open(out.parent/f'.{out.name}.lock', 'w') as lock:
        try:
            import fcntl; fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError: pass
        stamp = out/'.source-key'
        if not (stamp.exists() and stamp.read_text() == key and (out/'site.json').exists()):
            import subprocess
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--out', str(out)], cwd=root,
                               capture_output=True, text=True, timeout=600)
            log(r.stdout + r.stderr)
            if r.returncode != 0: raise BuildError(f"tools/build_site.py failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
            stamp.write_text(key)
        return json.loads((out/'site.json').read_text(encoding='utf-8'))

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', type=Path, default=DEFAULT_OUT, help=f"folder for the site (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument('--jobs', type=int, default=None, help="worker processes (default: 2, or fewer cores)")
    a = ap.parse_args(argv)
    try: build(a.out, jobs=a.jobs)
    except BuildError as e:
        print(f"build_site: {e}", file=sys.stderr); return 2
    return 0

if __name__ == '__main__': sys.exit(main())
