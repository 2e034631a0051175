"""What every command shares: logging, quiet third-party output, typed errors as exit codes, config overrides."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import sys
import types
import typing
from pathlib import Path

import typer

from retinaedge.cli._app import console


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def quiet(log_path: Path, verbose: bool):
    """Third-party warnings and progress dumps go to ``log_path`` unless --verbose (retinaedge.console)."""
    from retinaedge.console import quiet_output

    if not verbose:
        console.print(f"[dim]details: {log_path} (--verbose prints them here)[/dim]")
    return quiet_output(log_path, verbose)


def run_logged(log_path: Path, verbose: bool, status: str, run):
    """``run()`` with its output on the console (--verbose), or ``run(progress=False)`` behind a status line
    with the details in ``log_path``."""
    with quiet(log_path, verbose) as where:
        if verbose:
            return run()
        with where.console.status(status):
            return run(progress=False)


def fail(exc: Exception, code: int = 2) -> typing.NoReturn:
    console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
    raise typer.Exit(code)


def flag_overrides(**kwargs) -> dict:
    """Flags given on the command line; a repeatable flag given zero times leaves the YAML's value alone."""
    return {k: tuple(str(p) for p in v) if isinstance(v, list) else v for k, v in kwargs.items()
            if v is not None and v != []}


def _parse_value(text: str, annotation) -> object:
    """``text`` as the field's declared type (``float | None`` accepts ``none``)."""
    hint = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in hint and text.strip().lower() in ("none", "null", ""):
        return None
    kind = next(h for h in hint if h is not type(None))
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    return kind(text)


def config_overrides(config_cls: type, pairs: list[str] | None, flag: str) -> dict:
    """``["name=value", ...]`` checked against the frozen dataclass ``config_cls`` and converted to its field types,
    so a command exposes every field of a typed config without declaring each one again."""
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    overrides = {}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"{flag} takes NAME=VALUE, got {pair!r}")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ValueError(f"{flag}: {config_cls.__name__} has no field {name!r}{hint}")
        try:
            overrides[name] = _parse_value(text.strip(), hints[name])
        except ValueError as exc:
            raise ValueError(f"{flag} {name}: {exc}") from exc
    return overrides


def yaml_overrides(pairs: list[str] | None, flag: str = "--set") -> dict:
    """``["key=value", ...]`` with each value read as YAML (``0.5``, ``true``, ``[a, b]``, ``null``), exactly as the
    key would be written in the ``-c`` config file; the config class checks the keys and validates the values."""
    import yaml

    overrides = {}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        overrides[name.strip().replace("-", "_")] = yaml.safe_load(text) if text.strip() else None
    return overrides

