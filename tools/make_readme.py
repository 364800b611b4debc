"""Write README.md from nbs/index.ipynb without Quarto.

`nbdev_readme` needs Quarto, which cannot always be installed; this renders the same notebook to
GitHub Markdown with nbdev's own cell processing (hidden cells and directives removed, `echo: false`
cells show only their output). `--check` exits 1 when README.md is not what index.ipynb gives.
"""
import sys, re
from pathlib import Path
from nbdev.process import NBProcessor
from nbdev.processors import FrontmatterProc

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"

def _directives(src):
    return {m.group(1).strip(): m.group(2).strip() for m in re.finditer(r'^#\|\s*([\w-]+:?)\s*(.*)$', src, re.M)}

def _outputs(cell):
    out = []
    for o in cell.get('outputs', []):
        if o.get('output_type') == 'stream': out.append(''.join(o.get('text', '')))
        elif 'text/markdown' in o.get('data', {}): out.append(('MD', ''.join(o['data']['text/markdown'])))
        elif 'text/plain' in o.get('data', {}): out.append(''.join(o['data']['text/plain']))
    return out

def render(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    nb = NBProcessor(nb_path, procs=FrontmatterProc, process=True).nb
    fm = getattr(nb, 'frontmatter_', {}) or {}
    parts = [f"# {fm['title']}", f"> {fm['description']}"] if fm.get('title') else []
    for c in nb.cells:
        src, d = c.source, _directives(c.source)
        if c.cell_type == 'raw': continue
        if 'hide' in d or 'include:' in d and d['include:'] == 'false': continue
        if c.cell_type == 'markdown': parts.append(src.strip()); continue
        code = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith('#|')).strip()
        if d.get('echo:', 'true') != 'false' and code: parts.append(f"```python\n{code}\n```")
        for o in _outputs(c):
            if isinstance(o, tuple): parts.append(o[1].strip())
            elif o.strip(): parts.append(f"```\n{o.rstrip()}\n```")
    return HEADER + '\n\n'.join(p for p in parts if p) + '\n'

if __name__ == '__main__':
    text = render()
    readme = ROOT/'README.md'
    if '--check' in sys.argv:
        ok = readme.is_file() and readme.read_text() == text
        if not ok: print("README.md differs from what nbs/index.ipynb gives: run `python tools/make_readme.py`.")
        sys.exit(0 if ok else 1)
    tmp = readme.with_suffix('.md.tmp'); tmp.write_text(text); tmp.replace(readme)
    print(f"wrote {readme}")
