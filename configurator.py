"""
The one command-line convention of this repo, after nanoGPT's configurator.py (a function here instead of exec):
a script keeps its configuration as plain default values, and the command line overrides them.

    --key=value  or  --key value    cast to the default's type (an int stays an int; 1e-3 is a float)
    --flag                          a bool key alone means true; --flag=false turns it off
    --config=NAME                   start from one of the script's named presets; explicit keys still win

Keys are written with underscores. An unknown key, a value of the wrong type or outside a key's choices raises
UserError with a message that names the key, the value and what is allowed; a script's main(), decorated with
@cli, prints it as one `error:` line. `--help` prints the script's docstring and every key with its default and the
comment written beside it in the source.

It also holds the repo's one error path: library code raises UserError (or a subclass) with the message the user
will read, and never exits; @cli turns it into `error: <message>` and exit status 1. Anything else is a bug and
keeps its traceback.
"""

import ast
import difflib
import functools
import io
import math
import re
import sys
import tokenize

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class UserError(Exception):
    """Bad input, or a run that cannot go on: the message is the whole story, printed as one `error:` line."""
    prefix = "error: "


class _Help(Exception):  # --help: the text to print before a clean exit
    pass


def cli(main):
    """Decorates a script's main(): UserError becomes one `error: ...` line on stderr and exit status 1; --help
    prints and exits 0. The only place a script ends itself on purpose."""
    @functools.wraps(main)
    def run(*args, **kw):
        try:
            return main(*args, **kw)
        except _Help as h:
            print(h)
            sys.exit(0)
        except UserError as e:
            sys.exit(f"{e.prefix}{e}")
    return run


def cast(key, text, default, nested=False):
    """text -> the type of `default`: bool, int, float, str, or a tuple written "a,b" / "(a,b)" of the same length,
    each element cast to its default's type (nested: a name=value inside a list, where only "(a,b)" works). A bad
    value (a float that is inf or nan included) raises UserError."""
    if isinstance(default, tuple):
        parts = [p.strip() for p in text.strip().strip("()").split(",")]
        if len(parts) != len(default):
            like = f"({_show(default)})" if nested else _show(default)  # a bare comma would end a nested value
            raise UserError(f"--{key}={text} needs {len(default)} comma-separated values, like {like}")
        return tuple(cast(key, p, d) for p, d in zip(parts, default))
    if isinstance(default, bool):
        if text.lower() not in TRUE + FALSE:
            raise UserError(f"--{key}={text} is not a bool (true/false)")
        return text.lower() in TRUE
    try:
        value = type(default)(text)
    except ValueError:
        raise UserError(f"--{key}={text} is not {'an' if isinstance(default, int) else 'a'} "
                        f"{type(default).__name__} (default {_show(default)})") from None
    if isinstance(value, float) and not math.isfinite(value):  # inf passes every "> 0" check, nan fails none
        raise UserError(f"--{key}={text} is not a finite number")
    return value


def parse(argv, defaults, file, presets=None, choices=None, aliases=None, required=()):
    """-> a new dict: `defaults`, then the --config=NAME preset, then every --key=value of argv (None: the command
    line's), type-checked.

    file: the script's __file__ (its docstring and config comments make --help), or several files, the first
    one's docstring and comments first (a script whose config extends another's); presets: {name: {key: value}};
    choices: {key: allowed values}; aliases: {alias: key} (e.g. {"data": "data_dir"}); required: keys that must be
    given a non-empty value.
    """
    argv = sys.argv[1:] if argv is None else argv
    presets, choices, aliases = presets or {}, choices or {}, aliases or {}
    if any(a in ("-h", "--help") for a in argv):
        raise _Help(help_text(defaults, file, presets, choices, aliases))
    cfg, pairs, args = dict(defaults), [], list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not key:
            raise UserError(f"expected --key=value, got {arg!r} (see --help)")
        key = aliases.get(key, key)
        if key != "config" and key not in defaults:
            close = difflib.get_close_matches(key.replace("-", "_"), list(defaults) + list(aliases), n=1)
            raise UserError(f"unknown key --{key}" + (f" (did you mean --{close[0]}?)" if close else " (see --help)"))
        if not eq:
            if isinstance(defaults.get(key), bool):
                value = "true"
            elif args and not args[0].startswith("--"):
                value = args.pop(0)
            else:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
        pairs.append((key, value))
    for key, value in pairs:
        if key == "config":
            if value not in presets:
                raise UserError(f"unknown preset --config={value} (presets: {', '.join(presets)})")
            cfg.update(presets[value])
    for key, value in pairs:
        if key != "config":
            cfg[key] = cast(key, value, defaults[key])
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise UserError(f"--{key}={cfg[key]} is not one of: {', '.join(map(str, allowed))}")
    for key in required:
        if cfg[key] in ("", None):
            raise UserError(f"--{key} is required (see --help)")
    return cfg


def require(cfg, key, ok, allowed):
    """UserError unless ok(cfg[key]): `error: --key=value: allowed`. For the checks a type cannot express
    (lr > 0, batch_size >= 1, ...), made before any data or model is loaded."""
    if not ok(cfg[key]):
        raise UserError(f"--{key}={_show(cfg[key])}: {allowed}")


def parse_kw(key, text, defaults):
    """"a=1,b=(0.3,1.0)" -> {"a": 1, "b": (0.3, 1.0)}, every name one of `defaults` and cast to its default's type
    (for keyword overrides such as train_vit.py's augment_kw over data.augment's parameters)."""
    kw = {}
    for item in filter(None, (s.strip() for s in re.split(r",(?![^()]*\))", text))):
        name, eq, value = item.partition("=")
        if not eq or name.strip() not in defaults:
            raise UserError(f"--{key}: '{item}' is not name=value with name one of: {', '.join(defaults)}")
        kw[name.strip()] = cast(f"{key} {name.strip()}", value.strip(), defaults[name.strip()], nested=True)
    return kw


def config_comments(path):
    """{name: comment} for every line of a source file that reads `name = value  # comment` (a config block's
    line, or a keyword of a defaults dict(...)); the first such line of a name wins. Read as Python tokens, so a
    `#` inside a string is no comment."""
    lines = {}
    for tok in tokenize.generate_tokens(io.StringIO(open(path).read()).readline):
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            lines.setdefault(tok.start[0], []).append(tok)
    comments = {}
    for toks in lines.values():
        if len(toks) > 3 and toks[0].type == tokenize.NAME and toks[1].string == "=" and \
                toks[-1].type == tokenize.COMMENT:
            comments.setdefault(toks[0].string, toks[-1].string.lstrip("#").strip())
    return comments


def help_text(defaults, file, presets, choices, aliases):
    files = [file] if isinstance(file, str) else list(file)
    comments = {k: v for f in reversed(files) for k, v in config_comments(f).items()}  # the first file wins
    also = {key: alias for alias, key in aliases.items()}
    lines = [(ast.get_docstring(ast.parse(open(files[0]).read())) or "").strip(), "",
             "config (--key=value or --key value; a bool key alone means true):"]
    for key, default in defaults.items():
        note = comments.get(key, "")
        if key in choices and "|" not in note:
            note = f"one of {', '.join(map(str, choices[key]))}. {note}".strip()
        if key in also:
            note += f" (also --{also[key]})"
        lines.append(f"  {'--' + key + '=' + _show(default):<34s} {note}".rstrip())
    if presets:
        lines.append("presets: " + ", ".join(f"--config={name}" for name in presets))
    return "\n".join(lines)


def _show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
