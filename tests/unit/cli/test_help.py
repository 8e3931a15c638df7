"""Every option of every command says what it does, for operators, with no note meant for developers."""

from __future__ import annotations

import argparse

from relay.cli import build_parser

DEVELOPER_WORDS = ("argparse", "standard library", "todo", "xxx", "fixme", "hack", ".py")


def parsers(parser: argparse.ArgumentParser, name: str = "sendcloud-relay"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                yield from parsers(child, f"{name} {child_name}")


def test_every_option_has_help_for_operators():
    seen = 0
    for name, parser in parsers(build_parser()):
        texts = [parser.description or "", parser.epilog or ""]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}: no help"
            texts.append(action.help)
            seen += 1
        for text in texts:
            assert not any(word in text.lower() for word in DEVELOPER_WORDS), f"{name}: {text!r}"
    assert seen > 40  # the walk reached every command's options


def test_version_prints_the_distributions_version(capsys):
    from importlib.metadata import version

    import pytest

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sendcloud-relay {version('sendcloud-relay')}\n"
