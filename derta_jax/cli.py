"""What every entry point shares: a user error is one line on stderr, exit code 2.

    p = cli.ArgumentParser(prog="python -m derta_jax.<verb>")  # a bad flag: one line, exit 2
    if __name__ == "__main__":
        cli.run_main(main)       # ValueError, FileNotFoundError, NotADirectoryError: one line, exit 2
    app.run(main, flags_parser=cli.parse_absl_flags)           # absl entry points (train, inspect)

Anything else keeps its traceback. Every process prints (each may be the one a person reads).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Iterator, NoReturn

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)  # bad key, value, file or path


def fail(e: BaseException | str, code: int = 2) -> NoReturn:
    """`error: <message on one line>` on stderr, then exit `code`."""
    text = str(e).strip()
    if "Traceback (most recent call last)" in text:  # ml_collections quotes the config's error
        head, _, tail = text.partition("Traceback (most recent call last)")
        text = head.strip() + " " + tail.strip().splitlines()[-1]
    print(f"error: {' '.join(text.split())}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors(kinds: tuple[type[BaseException], ...] = USER_ERRORS) -> Iterator[None]:
    """Turns the user errors `kinds` raised inside into `fail(e, 2)`."""
    try:
        yield
    except kinds as e:
        fail(e)


def run_main(main: Callable[[], Any]) -> None:
    """Runs an argparse entry point's `main()` under `user_errors()`."""
    with user_errors():
        main()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (bad flag, bad value, missing flag) are one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (an `app.run` flags_parser) with a bad flag or config override as one
    line and exit code 2."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(e)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
        while isinstance(e, BaseException) and e.args:  # AttributeError(KeyError(text))
            e = e.args[0]
        fail(ValueError(f"unknown config key: {e}"))
