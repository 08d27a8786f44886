"""
The one command-line convention of this repo, after nanoGPT's configurator.py (a function here instead of exec):
a script keeps its configuration as plain default values, and the command line overrides them.

    --key=value  or  --key value    cast to the default's type (an int stays an int; 1e-3 is a float)
    --flag                          a bool key alone means true; --flag=false turns it off
    --config=NAME                   start from one of the script's named presets; explicit keys still win

Keys are written with underscores. An unknown key, a value of the wrong type or outside a key's choices ends the
program with one `error:` line that names the key, the value and what is allowed. `--help` prints the script's
docstring and every key with its default and the comment written beside it in the source.
"""

import ast
import difflib
import os
import re
import sys

import torch

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def cast(key, text, default):
    """text -> the type of `default`: bool, int, float, str, or a tuple written "a,b" / "(a,b)" of the same length,
    each element cast to its default's type. A bad value exits with one error line."""
    if isinstance(default, tuple):
        parts = [p.strip() for p in text.strip().strip("()").split(",")]
        if len(parts) != len(default):
            sys.exit(f"error: --{key}={text} needs {len(default)} comma-separated values, like {_show(default)}")
        return tuple(cast(key, p, d) for p, d in zip(parts, default))
    if isinstance(default, bool):
        if text.lower() not in TRUE + FALSE:
            sys.exit(f"error: --{key}={text} is not a bool (true/false)")
        return text.lower() in TRUE
    try:
        return type(default)(text)
    except ValueError:
        sys.exit(f"error: --{key}={text} is not {'an' if isinstance(default, int) else 'a'} "
                 f"{type(default).__name__} (default {_show(default)})")


def parse(argv, defaults, file, presets=None, choices=None, aliases=None, required=()):
    """-> a new dict: `defaults`, then the --config=NAME preset, then every --key=value of argv (None: the command
    line's), type-checked.

    file: the script's __file__ (its docstring and comments make --help); presets: {name: {key: value}};
    choices: {key: allowed values}; aliases: {alias: key} (e.g. {"data": "data_dir"}); required: keys that must be
    given a non-empty value.
    """
    argv = sys.argv[1:] if argv is None else argv
    presets, choices, aliases = presets or {}, choices or {}, aliases or {}
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(defaults, file, presets, choices, aliases))
        sys.exit(0)
    cfg, pairs, args = dict(defaults), [], list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not key:
            sys.exit(f"error: expected --key=value, got {arg!r} (see --help)")
        key = aliases.get(key, key)
        if key != "config" and key not in defaults:
            close = difflib.get_close_matches(key.replace("-", "_"), list(defaults) + list(aliases), n=1)
            sys.exit(f"error: unknown key --{key}" + (f" (did you mean --{close[0]}?)" if close else " (see --help)"))
        if not eq:
            if isinstance(defaults.get(key), bool):
                value = "true"
            elif args and not args[0].startswith("--"):
                value = args.pop(0)
            else:
                sys.exit(f"error: --{key} needs a value: --{key}=VALUE")
        pairs.append((key, value))
    for key, value in pairs:
        if key == "config":
            if value not in presets:
                sys.exit(f"error: unknown preset --config={value} (presets: {', '.join(presets)})")
            cfg.update(presets[value])
    for key, value in pairs:
        if key != "config":
            cfg[key] = cast(key, value, defaults[key])
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            sys.exit(f"error: --{key}={cfg[key]} is not one of: {', '.join(map(str, allowed))}")
    for key in required:
        if cfg[key] in ("", None):
            sys.exit(f"error: --{key} is required (see --help)")
    return cfg


def require(cfg, key, ok, allowed):
    """One error line unless ok(cfg[key]): `error: --key=value: allowed`. For the checks a type cannot express
    (lr > 0, batch_size >= 1, ...), made before any data or model is loaded."""
    if not ok(cfg[key]):
        sys.exit(f"error: --{key}={_show(cfg[key])}: {allowed}")


def parse_kw(key, text, defaults):
    """"a=1,b=(0.3,1.0)" -> {"a": 1, "b": (0.3, 1.0)}, every name one of `defaults` and cast to its default's type
    (for keyword overrides such as train_vit.py's augment_kw over data.augment's parameters)."""
    kw = {}
    for item in filter(None, (s.strip() for s in re.split(r",(?![^()]*\))", text))):
        name, eq, value = item.partition("=")
        if not eq or name.strip() not in defaults:
            sys.exit(f"error: --{key}: '{item}' is not name=value with name one of: {', '.join(defaults)}")
        kw[name.strip()] = cast(f"{key} {name.strip()}", value.strip(), defaults[name.strip()])
    return kw


def pick_device(name):
    """auto -> this process's CUDA device (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device={name} but torch sees no CUDA device here; use --device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        sys.exit(f"error: --device={name} is not a device (auto, cpu, cuda, cuda:1, ...)")


def help_text(defaults, file, presets, choices, aliases):
    source = open(file).read()
    comments = dict(re.findall(r"^\s*(\w+)\s*=(?!=)[^#\n]*#\s*(.*)$", source, re.M)[::-1])  # first one wins
    also = {key: alias for alias, key in aliases.items()}
    lines = [(ast.get_docstring(ast.parse(source)) or "").strip(), "",
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
