"""Settings for the three scripts, nanoGPT's configurator with clear errors.

A script declares its settings as module-level constants, each with a short `# comment`, then calls
`configure(globals(), __file__)`. Arguments are `--key=value` overrides and positional settings files
(python files whose assignments override the defaults), applied left to right. A setting with a fixed set of
values is declared as `name = choice('default', 'other', ...)`: configure() refuses any other value.
"""
import ast
import difflib
import json
import os
import re
import sys

TYPES = (bool, int, float, str, tuple, list)


class Choice(str):
    """A str setting's default that also carries its allowed values (the default first)."""
    options = ()


def choice(default, *others):
    """Declare a choice setting: its default and the other allowed values."""
    c = Choice(default)
    c.options = (default, *others)
    return c


def _settings(g, path):
    """Names and comments of the module-level constants declared above the configure() call."""
    comments, names, last = {}, [], None
    for line in open(path, encoding='utf-8'):
        if re.search(r'\bconfigure\(', line):
            break
        m = re.match(r'^([a-z_][a-z0-9_]*)\s*=[^#]*(?:#\s*(.*))?$', line)
        more = re.match(r'^\s+#\s*(.*)$', line)
        if more and last:  # an indented comment line continues the setting above it
            comments[last] += ' ' + more.group(1).strip()
        elif m and isinstance(g.get(m.group(1)), TYPES):
            last = m.group(1)
            names.append(last)
            comments[last] = (m.group(2) or '').strip()
        else:
            last = None
    return names, comments


def _coerce(key, value, default, source):
    """Value converted to the type of the default, or one sentence saying what was expected."""
    want = type(default)
    if isinstance(value, str) and want is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if want is float and type(value) is int:
        value = float(value)
    if want in (tuple, list) and isinstance(value, (tuple, list)):
        value = want(value)
    if type(value) is not want:
        raise SystemExit(f"{source}: setting '{key}' expects {want.__name__} (default {default!r}), got {value!r}")
    return value


def configure(g, path, argv=None):
    """Apply settings files and --key=value arguments to the module globals `g`; return the resolved dict."""
    names, comments = _settings(g, path)
    options = {n: g[n].options for n in names if isinstance(g[n], Choice)}
    for n in options:
        g[n] = str(g[n])
    argv = sys.argv[1:] if argv is None else argv
    if '--help' in argv or '-h' in argv:
        print(f'usage: python {os.path.basename(path)} [settings.py ...] [--key=value ...]\n')
        width = max(len(n) for n in names)
        for n in names:
            allowed = f" ({' | '.join(options[n])})" if n in options else ''
            print(f'  --{n:<{width}} = {g[n]!r:<24} {comments[n]}{allowed}')
        raise SystemExit(0)

    def check(key, source):
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else '; see --help for the list'
            raise SystemExit(f"{source}: unknown setting '{key}'{hint}")

    for arg in argv:
        if arg.startswith('--'):
            key, eq, value = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"argument '{arg}': write settings as --key=value")
            check(key, f"argument '{arg}'")
            g[key] = _coerce(key, value, g[key], f"argument '{arg}'")
        else:
            if not os.path.isfile(arg):
                raise SystemExit(f"settings file '{arg}' not found (positional arguments are settings files)")
            scope = {}
            exec(compile(open(arg, encoding='utf-8').read(), arg, 'exec'), scope)
            for key, value in scope.items():
                if key.startswith('_') or type(value).__name__ == 'module':
                    continue
                check(key, f"settings file '{arg}'")
                g[key] = _coerce(key, value, g[key], f"settings file '{arg}'")
    for n, allowed in options.items():
        if g[n] not in allowed:
            close = difflib.get_close_matches(g[n], allowed, n=1, cutoff=0.5)
            hint = f' (did you mean {close[0]}?)' if close else ''
            raise SystemExit(f"setting '{n}' is {g[n]!r}{hint}: choose {', '.join(allowed)}")
    return {n: g[n] for n in names}


def require(g, *rules):
    """Refuse at start, in one sentence naming the settings and the rule, the first rule (a Python expression over
    the settings in g, e.g. '0 <= ema_decay < 1') that does not hold."""
    for rule in rules:
        if not eval(rule, {}, dict(g)):
            names = sorted({n.id for n in ast.walk(ast.parse(rule)) if isinstance(n, ast.Name) and n.id in g})
            raise SystemExit(f"{', '.join(f'--{n}={g[n]!r}' for n in names)}: the settings need {rule}")


def save_config(cfg, out_dir):
    """Write the resolved settings to out_dir/config.json (atomically, like every file we write)."""
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, 'config.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, 'config.json'))


def run(main):
    """main(), with the loaders' bad-input errors (ValueError, FileNotFoundError: one sentence naming the file, line
    or key) ending the program as that sentence on stderr and exit status 1, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f'error: {err}') from None
