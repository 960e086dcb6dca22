"""The command line's one vocabulary (issue 25 items 6 and 9): every default in every command's
--help, one name per concept on every command that has it, old spellings working with a warning,
a --model that names nothing is a usage error (exit 2), the registry model described."""
from __future__ import annotations

import argparse

import pytest

from ecospa import cli
from ecospa.cli import COMMANDS, build_parser
from ecospa.cli import harness

COMPUTING = ("train", "compress", "eval", "generate", "harness")
# concept -> (its one name, the commands that have the concept)
CONCEPTS = {
    "evaluation windows": ("--eval-windows", ("eval", "compress")),
    "export format": ("--format", ("export", "compress")),
    "weight dtype": ("--dtype", ("train", "export")),
    "CPU threads": ("--threads", COMPUTING),
    "device": ("--device", ("train", "eval", "generate")),
    "model": ("--model", ("compress", "eval", "generate", "export", "harness")),
}
OLD = {("eval", "--max-windows"): "--eval-windows", ("compress", "--export-format"): "--format"}


def _parsers() -> dict:
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {**sub.choices, "harness": harness.build_parser()}


def _required_groups(p) -> set:
    return {id(a) for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}


def _help_of(p, action) -> str:
    fmt = p._get_formatter()
    fmt.add_argument(action)
    return " ".join(fmt.format_help().split())


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value)


@pytest.mark.parametrize("name", [*COMMANDS, "harness"])
def test_help_shows_every_default(name):
    p = _parsers()[name]
    required = _required_groups(p)
    for a in p._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
            continue
        flag = a.option_strings[0]
        assert a.help, f"{name} {flag} has no help text"
        text = _help_of(p, a)
        if a.required or id(a) in required or (a.nargs == 0 and a.default is False):
            continue
        if a.default is None:  # no value to show: the help must say what happens without it
            assert "default" in text, f"{name} {flag}: help does not say its default: {text!r}"
        else:
            assert f"default: {_shown(a.default)}" in text, f"{name} {flag}: {text!r}"


def test_train_help_says_what_the_preset_sets():
    text = " ".join(_parsers()["train"].format_help().split())
    assert "what each --preset sets" in text and "llama-1b" in text and "c4 (t5-base)" in text
    assert "--steps STEPS total optimizer steps (the schedules follow; with --resume: a larger number " \
        "extends the run, the pruning schedule stays) (default: the --preset's value; tiny: 600)" in text


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_one_name_per_concept_on_every_command_that_has_it(concept):
    flag, commands = CONCEPTS[concept]
    parsers = _parsers()
    for name in commands:
        assert flag in parsers[name]._option_string_actions, f"{name} has no {flag} ({concept})"
    for (name, old), new in OLD.items():
        assert old not in parsers[name].format_help(), f"{name} --help still shows {old}"


@pytest.mark.parametrize("argv, dest, want, old", [
    (["eval", "--model", "m", "--max-windows", "7"], "max_windows", 7, "--max-windows"),
    (["compress", "--model", "m", "--budget", "0.5", "--export-format", "gguf"], "export_format", "gguf",
     "--export-format"),
])
def test_old_spellings_still_work_and_warn(capsys, argv, dest, want, old):
    args = build_parser()[0].parse_args(argv)
    assert getattr(args, dest) == want
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{old} is deprecated; use {OLD[(argv[0], old)]}" in err


@pytest.mark.parametrize("argv, want", [
    (["export", "--model", "m", "--format", "gguf", "--out", "x.gguf", "--dtype", "f16"], "float16"),
    (["export", "--model", "m", "--format", "gguf", "--out", "x.gguf", "--dtype", "float16"], "float16"),
    (["export", "--model", "m", "--format", "gguf", "--out", "x.gguf"], "float32"),
    (["train", "--dtype", "f32"], "float32"),
    (["train", "--dtype", "bf16"], "bfloat16"),
    (["train", "--dtype", "float64"], "float64"),
])
def test_both_dtype_spellings_are_accepted(capsys, argv, want):
    assert build_parser()[0].parse_args(argv).dtype == want
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "{missing}"],
    ["generate", "--model", "{missing}", "--prompt", "hi"],
    ["export", "--model", "{missing}", "--format", "hf-padded", "--out", "{out}"],
])
def test_a_model_that_names_nothing_is_a_usage_error(tmp_path, capsys, argv):
    argv = [a.format(missing=tmp_path / "no-such-model", out=tmp_path / "out") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no model" in err and "--debug" not in err


def test_top_level_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    for name in COMMANDS:
        assert name in description, f"ecospa --help's description leaves out {name}"


@pytest.mark.parametrize("name", ["compress", "eval", "generate", "export", "harness"])
def test_model_help_says_what_the_registry_model_is(name):
    text = " ".join(_parsers()[name].format_help().split())
    assert "smollm2-135m: SmolLM2-135M-Instruct quantized Q4_1" in text
