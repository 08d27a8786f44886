"""configurator.py: the one --key=value convention of every CLI."""

import pytest

import configurator
from conftest import error_line

DEFAULTS = dict(
    data_dir="data/x",  # where the data is
    lr=1e-3,  # peak learning rate
    epochs=3,
    resume=False,  # continue a run
    mode="a",
    crop=(0.5, 1.0),
)
PRESETS = {"fast": dict(epochs=1, mode="b")}


def parse(*argv, **kw):
    return configurator.parse(list(argv), DEFAULTS, __file__, presets=PRESETS, choices={"mode": ("a", "b")},
                              aliases={"data": "data_dir"}, **kw)


def error(*argv, **kw):
    """The one error line a script whose main() parses argv prints."""
    return error_line(configurator.cli(lambda args: parse(*args, **kw)), argv)


def test_forms_types_presets_and_aliases():
    cfg = parse("--lr=0.1", "--epochs", "7", "--resume", "--data", "d", "--crop=(0.3,0.9)")
    assert cfg == dict(data_dir="d", lr=0.1, epochs=7, resume=True, mode="a", crop=(0.3, 0.9))
    assert type(cfg["epochs"]) is int and type(cfg["lr"]) is float
    assert parse("--lr=1e-4")["lr"] == 1e-4 and parse("--resume=false")["resume"] is False
    assert parse("--epochs=5", "--config=fast") == {**DEFAULTS, "epochs": 5, "mode": "b"}  # explicit keys win
    assert parse() == DEFAULTS and parse() is not DEFAULTS


def test_errors_name_the_key_the_value_and_what_is_allowed():
    assert error("--epochs=2.5") == "error: --epochs=2.5 is not an int (default 3)"
    assert error("--lr=fast") == "error: --lr=fast is not a float (default 0.001)"
    assert error("--resume=maybe") == "error: --resume=maybe is not a bool (true/false)"
    assert error("--mode=c") == "error: --mode=c is not one of: a, b"
    assert error("--crop=0.1") == "error: --crop=0.1 needs 2 comma-separated values, like 0.5,1.0"
    assert error("--data-dir=x") == "error: unknown key --data-dir (did you mean --data_dir?)"
    assert error("--config=slow") == "error: unknown preset --config=slow (presets: fast)"
    assert error("epochs=2") == "error: expected --key=value, got 'epochs=2' (see --help)"
    assert error("--lr") == "error: --lr needs a value: --lr=VALUE"
    with pytest.raises(configurator.UserError, match=r"^--ckpt is required \(see --help\)$"):
        configurator.parse([], {"ckpt": ""}, __file__, required=("ckpt",))


def test_parse_kw_casts_to_each_default():
    kw = configurator.parse_kw("augment_kw", "blur_kernel=3, blur_p=0,crop_scale=(0.3,1.0)",
                               {"blur_kernel": 5, "blur_p": 0.5, "crop_scale": (0.5, 1.0)})
    assert kw == {"blur_kernel": 3, "blur_p": 0.0, "crop_scale": (0.3, 1.0)} and type(kw["blur_kernel"]) is int
    with pytest.raises(configurator.UserError) as e:
        configurator.parse_kw("augment_kw", "nope=1", {"blur_p": 0.5})
    assert str(e.value) == "--augment_kw: 'nope=1' is not name=value with name one of: blur_p"


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        configurator.cli(lambda: parse("--lr=2", "--help"))()
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("configurator.py: the one --key=value convention of every CLI.")
    assert "--data_dir=data/x" in out and "where the data is (also --data)" in out
    assert "peak learning rate" in out and "--crop=0.5,1.0" in out and "--config=fast" in out


def test_help_reads_comments_as_python_tokens(tmp_path):
    script = tmp_path / "script.py"
    script.write_text('"""doc"""\n'
                      'title = "# not a comment"\n'
                      'lr = 0.1  # the peak rate\n'
                      'BLOCK = dict(\n'
                      '    size=80,  # pixels\n'
                      ')\n'
                      'def f():\n'
                      '    lr = 2  # a local, not the key\n')
    assert configurator.config_comments(str(script)) == {"lr": "the peak rate", "size": "pixels"}


def test_cli_turns_user_errors_into_one_line_and_keeps_bugs_loud():
    def main(argv):
        if argv == ["user"]:
            raise configurator.UserError("--x=1: must be 2")
        raise KeyError("a bug")

    assert error_line(configurator.cli(main), ["user"]) == "error: --x=1: must be 2"
    with pytest.raises(KeyError):  # not bad input: the traceback stays
        configurator.cli(main)(["bug"])
