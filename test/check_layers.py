#!/usr/bin/env python3
"""The layers of lib/ point one way (README "Layout", ../shared/STYLE.md): no file includes a
header of a layer above its own, and device/ and control/ (one level) never include each other.

    check_layers.py SOURCE_ROOT

Layers, lowest first: include/hma/error.hpp and version.hpp (declarations only); support/; core
(lib/*.{hpp,cpp} and the other public headers but averager.hpp and hma.hpp); device/ and
control/; transport/; averager/ and include/hma/averager.hpp; the faces (capi/, python/,
fortran/, include/hma/hma.hpp). Exit 1 naming every include that points upward."""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), '..')
os.chdir(root)


def layer(path):
    if path in ('include/hma/error.hpp', 'include/hma/version.hpp'):
        return 0, 'base'
    if path.startswith('lib/support/'):
        return 1, 'support'
    for folder in ('device', 'control'):
        if path.startswith('lib/%s/' % folder):
            return 3, folder
    if path.startswith('lib/transport/'):
        return 4, 'transport'
    if path.startswith('lib/averager/') or path == 'include/hma/averager.hpp':
        return 5, 'averager'
    if path.startswith(('lib/capi/', 'lib/python/', 'lib/fortran/')) or path in (
            'include/hma/hma.hpp', 'include/hma/hma.h'):
        return 6, 'face'
    if path.startswith('include/hma/') or (path.startswith('lib/') and path.count('/') == 1):
        return 2, 'core'
    return None


bad = []
files = 0
for top in ('lib', 'include/hma'):
    for d, _, names in os.walk(top):
        for n in names:
            if not n.endswith(('.cpp', '.hpp', '.cu', '.cuh', '.h')):
                continue
            f = os.path.normpath(os.path.join(d, n))
            mine = layer(f)
            if mine is None:
                bad.append('%s: in no layer' % f)
                continue
            files += 1
            with open(f, encoding='utf-8') as fh:
                text = fh.read()
            for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M):
                cands = [os.path.normpath(c) for c in ('lib/' + inc, 'include/' + inc, os.path.join(d, inc))]
                target = next((c for c in cands if os.path.exists(c)), None)
                if target is None:
                    continue  # generated (version.hpp in the build tree) or system
                theirs = layer(target)
                if theirs is None:
                    bad.append('%s includes %s: in no layer' % (f, target))
                elif theirs[0] > mine[0] or (theirs[0] == mine[0] == 3 and theirs[1] != mine[1]):
                    bad.append('%s (%s) includes %s (%s)' % (f, mine[1], target, theirs[1]))
if files < 50:
    bad.append('only %d files found under %s: wrong source root?' % (files, os.getcwd()))
for b in bad:
    print('layers: ' + b)
print('layers: %d files, %d upward includes' % (files, len(bad)))
sys.exit(1 if bad else 0)
