"""The README and docs/ say what the code does: every link and anchor resolves, the README stays a
short front door whose test command is CI's, and every command they show names a script that
exists, flags that script takes and config keys the config has.

    python -m pytest tests/test_docs.py -q
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
PAGES = [README] + sorted((ROOT / 'docs').glob('*.md'))
README_MAX_LINES = 200                     # issue 29: a front door, the rest in docs/

LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
CODE_SPAN = re.compile(r'`([^`]+)`')
SCRIPT = re.compile(r'(?:^|\s)(?:python|sh|sbatch[^\n]*?|torchrun[^\n]*?)\s+((?:[\w./-]+/)?[\w-]+\.(?:py|sh))\b')
MODULE = re.compile(r'(?:^|\s)python -m ([\w.]+)')


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'[`*_]', '', heading.strip().lower())
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(page: Path) -> set[str]:
    out, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith('```'):
            fenced = not fenced
        elif not fenced and line.startswith('#'):
            out.add(slug(line.lstrip('#')))
    return out


def commands(page: Path) -> list[str]:
    """Command lines a page shows: fenced `sh` blocks, indented blocks and `code spans` that run a tool."""
    out, fenced = [], False
    for line in page.read_text().splitlines():
        if line.startswith('```'):
            fenced = not fenced
            continue
        if fenced or line.startswith('    '):
            out.append(line.strip().lstrip('$ '))
        else:
            out += [span for span in CODE_SPAN.findall(line)
                    if re.match(r'(python|sh|torchrun|sbatch) ', span)]
    return [c.split('  #')[0].strip() for c in out if c.strip()]


def test_readme_is_a_front_door():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f'README.md has {n} lines; move detail to docs/ (at most {README_MAX_LINES})'


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()[-1].strip()
    assert ci.startswith('python -m pytest'), ci
    assert f'`{ci}`' in README.read_text() or f'\n{ci}' in README.read_text(), \
        f'README does not give the test command CI runs: {ci}'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r'[a-z]+://', target) or target.startswith('mailto:'):
            continue
        path, _, anchor = target.partition('#')
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f'{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            broken.append(f'{target}: no heading #{anchor} in {dest.name}')
    assert not broken, f'{page.name}: ' + '; '.join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    unlinked = [p.name for p in PAGES[1:] if f'docs/{p.name}' not in text]
    assert not unlinked, f'docs pages the README does not link: {unlinked}'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_commands_name_scripts_and_modules_that_exist(page):
    missing = []
    for cmd in commands(page):
        for script in SCRIPT.findall(' ' + cmd):
            if not (ROOT / script).exists():
                missing.append(f'{script} ({cmd})')
        for module in MODULE.findall(' ' + cmd):
            if module in ('pytest', 'pip', 'torch.distributed.run'):
                continue
            base = ROOT / module.replace('.', '/')
            if not (base.with_suffix('.py').exists() or (base / '__main__.py').exists()):
                missing.append(f'python -m {module} ({cmd})')
    assert not missing, f'{page.name}: commands name what does not exist: {missing}'


@lru_cache(maxsize=None)
def script_help(script: str) -> str:
    proc = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f'{script} --help failed: {proc.stderr[-500:]}'
    return proc.stdout


def python_commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for cmd in commands(page):
            m = re.search(r'(?:^|\s)python ((?:tools/)?[\w]+\.py)\b(.*)', cmd)
            if m and (ROOT / m.group(1)).exists():
                out.append((page.name, m.group(1), m.group(2)))
    return out


def test_flags_shown_are_flags_the_scripts_take():
    wrong = []
    for page, script, rest in python_commands():
        for flag in re.findall(r'(?<![\w-])(--[a-z][\w-]*)', rest):
            if not re.search(rf'(?<![\w-]){re.escape(flag)}(?![\w-])', script_help(script)):
                wrong.append(f'{page}: {script} {flag}')
    assert not wrong, f'flags the docs show that the scripts do not take: {sorted(set(wrong))}'


def known_config_keys() -> set[str]:
    from engine.config import Config
    return {f.name for f in dataclasses.fields(Config)}


def test_config_overrides_shown_are_config_keys():
    """`key=value` on a training, evaluation or benchmark command line names a config key."""
    keys, wrong = known_config_keys(), []
    for page in PAGES:
        for cmd in commands(page):
            if not re.search(r'(scripts/train\.sh|unimatch_v2\.py|supervised\.py|evaluate\.py|benchmark\.py|'
                             r'predict\.py|reproduce\.sh)', cmd):
                continue
            for key in re.findall(r'(?:^|\s)([a-z_][\w.]*)=\S', cmd):
                if key.split('.')[0] not in keys and key not in ('CUDA_VISIBLE_DEVICES', 'EXP_DIR'):
                    wrong.append(f'{page.name}: {key} ({cmd})')
    assert not wrong, f'overrides the docs show that no config key takes: {wrong}'
