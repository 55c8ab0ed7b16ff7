"""Every pointer in README.md, docs/*.md, requirements*.txt, the Makefile's comments and the docstrings
names something that exists: a file (`attack.py`, `docs/speed.md`, `tools/bench.py`), a name
(`gradnorm.gradnorm_fd`, `tools.bench_grad.timed_step`: a def, class or assignment read from the
module's source; `torch.compile`: found in the installed package), a `make TARGET` of the Makefile,
a link. And the README stays a short tutorial."""

import ast
import glob
import importlib
import importlib.util
import io
import os
import re
import tokenize

import pytest

from tests.conftest import HERE, parse_file

DOCS = ['README.md', *sorted(os.path.relpath(f, HERE) for f in glob.glob(os.path.join(HERE, 'docs', '*.md')))]
REQUIREMENTS = sorted(os.path.relpath(f, HERE) for f in glob.glob(os.path.join(HERE, 'requirements*.txt')))
# Written in backticks, yet no name of this repository or of an installed package: keep this short.
NOT_NAMES = {
    'head.weight',  # a state-dict key
    'model.eval()',  # any nn.Module's method
    'ctx.needs_input_grad',  # an autograd.Function's context
    'graph.group_operations',  # FFCV's pipeline internals
    'resnet50.a1_in1k',  # a timm weight tag
    'val.txt',  # ARES-Bench's list
    # the authors' scripts (docs/paper.md)
    'adversarial_training.py',
    'adversarial_training_cifar.py',
    'eval_white_box_cifar.py',
    'prn.py',
    'adversarial_training_logit.py',
    'gradient_teachers.py',
    'swin_transformer_timm_version.py',
}
ALIASES = {  # how the docs shorten torch's namespaces
    'F': 'torch.nn.functional',
    'nn': 'torch.nn',
    'autograd': 'torch.autograd',
    'cudnn': 'torch.backends.cudnn',
}
FILE_EXT = ('.py', '.md', '.txt', '.toml')  # a name ending so is a file of the repository
OUTPUT_EXT = ('.json', '.jsonl', '.csv', '.pt', '.pth', '.png', '.log', '.yaml', '.sh', '.gz', '.beton')
DOCUMENTED = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
SKIP_DIRS = {'.git', '.venv', 'runs', '__pycache__', '.pytest_cache', '.ruff_cache'}


def repo_files():
    out = set()
    for root, dirs, files in os.walk(HERE):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        out |= {os.path.relpath(os.path.join(root, f), HERE) for f in files}
    return out


FILES = repo_files()
DIRS = {os.path.dirname(f) for f in FILES} - {''}
TOP_DIRS = {d.split(os.sep)[0] for d in DIRS}


def makefile_targets():
    text = open(os.path.join(HERE, 'Makefile')).read()
    return {t for line in re.findall(r'^([\w. -]+):(?!=)', text, re.M) for t in line.split()}


def defined(tree, names):
    """names[0] is a top-level def, class or assignment of tree; names[1], if any, one of that class's."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found = {node.name}
        elif isinstance(node, ast.Assign):
            found = {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found = {node.target.id}
        else:
            continue
        if names[0] in found:
            return len(names) == 1 or not isinstance(node, ast.ClassDef) or defined(node, names[1:])
    return False


def module_path(parts):
    """The longest prefix of parts that is a module of the repository (bare tools/ and recipes/ names
    too: `characterize.summary`) -> (its file, the rest), or (None, parts)."""
    for k in range(len(parts), 0, -1):
        for d in ('', 'tools', 'recipes'):
            f = os.path.join(d, *parts[:k]) + '.py'
            if f in FILES:
                return f, parts[k:]
    return None, parts


def installed(dotted):
    """dotted names something importable: a module, or an attribute of the longest importable prefix."""
    parts = dotted.split('.')
    parts[:1] = ALIASES.get(parts[0], parts[0]).split('.')
    if importlib.util.find_spec(parts[0]) is None:
        return False
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:k]))
        except ImportError:
            continue
        for p in parts[k:]:
            if not hasattr(obj, p):
                return False
            obj = getattr(obj, p)
        return True
    return False


def wrong(token):
    """Why token (as written in backticks) names nothing, or None."""
    if token in NOT_NAMES:
        return None
    token = token.removesuffix('()')
    if token in NOT_NAMES or re.search(r'[<>*{}\s]', token) or token.endswith(OUTPUT_EXT):
        return None
    if '/' in token:
        top = token.split('/')[0]
        if top in TOP_DIRS and not os.path.exists(os.path.join(HERE, token)):
            return 'no such file'
        return None
    if token.endswith(FILE_EXT):
        if token in FILES or any(os.path.basename(f) == token for f in FILES):
            return None
        return 'no such file'
    if not re.fullmatch(r'[A-Za-z_]\w*(\.[A-Za-z_]\w*)+', token):
        return None
    path, rest = module_path(token.split('.'))
    if path is not None:
        ok = not rest or defined(parse_file(os.path.join(HERE, path)), rest)
        return None if ok else f'{path} defines no {".".join(rest)}'
    return None if installed(token) else 'neither a module here nor an installed name'


def make_target(command):
    """The first target of a `make ...` command line: past options (and -o/-C/-f's argument), not a
    VAR=value, not a PLACEHOLDER or ...; or None."""
    words = command.split()[1:]
    while words and words[0].startswith('-'):
        words = words[2:] if words[0] in ('-o', '-C', '-f') else words[1:]
    if words and re.fullmatch(r'[a-z][\w-]*', words[0]):
        return words[0]
    return None


def pointers(text):
    """(kind, token) for every pointer in markdown or comment text: backticked names, names in code
    blocks (files, -m modules, from-imports), `make` targets."""
    out = []
    for block in re.findall(r'```\w*\n(.*?)```', text, re.S):
        out += [('name', t) for t in re.findall(r'(?<![\w./*-])((?:[\w-]+/)*[\w-]+\.(?:py|md|txt))\b', block)]
        out += [('name', m.replace('.', '/') + '.py') for m in re.findall(r'-m ([\w.]+)', block)]
        for mod, names in re.findall(r'^from ([\w.]+) import ([\w, ]+)', block, re.M):
            out += [('name', f'{mod}.{n.strip()}') for n in names.split(',')]
        out += [('make', make_target(c)) for c in re.findall(r'^make .*', block, re.M) if make_target(c)]
    prose = re.sub(r'```.*?```', '', text, flags=re.S)
    for tok in re.findall(r'`([^`\n]+)`', prose):
        if tok.startswith('make '):
            out += [('make', make_target(tok))] if make_target(tok) else []
        else:
            out.append(('name', tok))
    return out


def notes(path):
    """A module's docstrings and comments; the comments of any other file."""
    src = open(os.path.join(HERE, path)).read()
    if not path.endswith('.py'):
        return '\n'.join(re.findall(r'#(.*)', src))
    tree = parse_file(os.path.join(HERE, path))
    docs = [ast.get_docstring(n) or '' for n in [tree, *ast.walk(tree)] if isinstance(n, DOCUMENTED)]
    lines = io.StringIO(src).readline
    return '\n'.join(docs + [t.string for t in tokenize.generate_tokens(lines) if t.type == tokenize.COMMENT])


def sources():
    """(file, text to check): the docs whole; of requirements, the Makefile and every module, the
    docstrings and comments: what they backtick. In all of them, file names and names of the repository's
    modules (`train.objective`) count backticked or not."""
    modules = sorted(
        (f[:-3].replace('/', '.') for f in FILES if re.fullmatch(r'(tools/)?\w+\.py', f)), key=len
    )
    named = '|'.join(re.escape(m) for m in reversed(modules))
    bare = rf'(?<![\w`/.*-])((?:[\w-]+/)*\w+\.(?:py|md)|(?:{named})(?:\.[A-Za-z_]\w*)+)\b'
    for f in DOCS + REQUIREMENTS + ['Makefile'] + sorted(x for x in FILES if x.endswith('.py')):
        text = open(os.path.join(HERE, f)).read() if f in DOCS else notes(f)
        prose = re.sub(r'`[^`\n]*`', '', re.sub(r'```.*?```', '', text, flags=re.S))
        if f not in DOCS:
            text = ' '.join(re.findall(r'`[^`\n]+`', text))
        yield f, text + ' ' + ' '.join(f'`{x}`' for x in re.findall(bare, prose))


def readme_sections(text):
    """The README sections text names: README's "Speed", (README, Troubleshooting)."""
    return re.findall(r'README(?:\'s|,)\s+"([^"]+)"', text) + re.findall(r'\(README, ([A-Z][\w ]*)\)', text)


def bad_pointers():
    targets, bad = makefile_targets(), []
    headings = re.findall(r'^#+ (.*)', open(os.path.join(HERE, 'README.md')).read(), re.M)
    for f in DOCS + sorted(x for x in FILES if x.endswith('.py')):
        for name in readme_sections(open(os.path.join(HERE, f)).read()):
            if not any(name.lower() in h.lower() for h in headings):
                bad.append(f'{f}: README section "{name}": no such heading')
    for f, text in sources():
        for kind, token in pointers(text):
            why = (None if token in targets else 'no such make target') if kind == 'make' else wrong(token)
            if why:
                bad.append(f'{f}: `{token}`: {why}')
    return sorted(set(bad))


def test_every_pointer_in_the_docs_names_something_that_exists():
    assert bad_pointers() == []


@pytest.mark.parametrize(
    'token',
    [
        'gradnorm.gradnrom',
        'gradnrom.gradnorm',
        'tools.bench.no_such',
        'attack.State.no_such',
        'no_such.py',
        'docs/no_such.md',
        'tools/no_such.py',
        'torch.no_such',
        'recipes/paper.pyc.py',
    ],
)
def test_a_wrong_name_is_caught(token):
    assert wrong(token) is not None


@pytest.mark.parametrize(
    'token',
    [
        'gradnorm.gradnorm',
        'tools.bench_grad.timed_step',
        'characterize.summary',
        'config.Config.seed',
        'recipes/paper.py',
        'paper.py',
        'bench.py',
        'test_attack.py',
        'docs/speed.md',
        'lists/',
        'torch.compile',
        'F.conv2d',
        'config.end_distributed()',
        'runs/x/ckpt.pt',
        'timm/resnet50',
    ],
)
def test_a_right_name_passes(token):
    assert wrong(token) is None


def test_readme_sections_are_found_where_other_files_name_them():
    assert readme_sections('see the README\'s "Evaluating robustness" (README, Troubleshooting)') == [
        'Evaluating robustness',
        'Troubleshooting',
    ]


def test_make_targets_are_checked_against_the_makefile():
    targets = makefile_targets()
    assert {'train-gradnorm', 'eval', 'test', 'check-gpu', 'bench'} <= targets and 'RUN_DIR' not in targets
    assert pointers('run `make train-gradnrom` or\n```\nmake tset AA=1\n```\n') == [
        ('make', 'tset'),
        ('make', 'train-gradnrom'),
    ]


def test_readme_is_a_short_tutorial_whose_links_exist():
    """README under 200 lines, readable in one sitting (measurements live in docs/); every relative link of
    the docs points at a file."""
    for f in DOCS:
        text = open(os.path.join(HERE, f)).read()
        assert f != 'README.md' or len(text.splitlines()) < 200
        for target in re.findall(r'\]\(([^)#:]+)\)', text):
            assert os.path.exists(os.path.join(HERE, os.path.dirname(f), target)), (f, target)
