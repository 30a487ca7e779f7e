"""How the command lines report failures: one paragraph on stderr, no traceback, exit code 2.

    sys.exit(run_command("interp-eval", lambda argv: ..., argv))

A bad input (a wrong value, file or config: ValueError, TypeError, KeyError, LookupError, OSError,
argparse/jsonargparse errors, a checkpoint that does not fit its config) exits with 2; Ctrl-C
exits with 130; an unexpected failure (a bug) exits with 1, also as one paragraph. ``--debug``
anywhere on the command line, or ``INTERP_DEBUG=1`` in the environment, re-raises instead so
that developers get the full traceback. (Torch-free on import, so that ``interp-eval --help`` and
argument errors answer at once; ``interp-train`` uses it too.)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "INTERP_DEBUG"
USAGE_ERROR = 2
INTERRUPTED = 130
MAX_CHARS = 900

class DegenerateModelError(ValueError):
    """A quantity the model cannot have: a LIB node layer constant over the data, or input gradients
    that are all exactly zero — e.g. a network that collapsed in training. A property of the
    model, not of the arguments (still a ValueError: the CLIs report it as a bad input)."""


BAD_INPUT = (ValueError, TypeError, LookupError, OSError, argparse.ArgumentError, FloatingPointError)


def pop_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without ``--debug``, whether debugging was asked for by the flag or the environment)."""
    argv = list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return [a for a in argv if a != DEBUG_FLAG], debug


def run_command(prog: str, command: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """Runs ``command(argv)`` and turns any exception into a one-paragraph message and an exit code."""
    argv, debug = pop_debug_flag(argv)
    if debug:
        return command(argv) or 0
    try:
        return command(argv) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); files already written are complete, nothing half-written "
              "was left in place.", file=sys.stderr)
        return INTERRUPTED
    except SystemExit as err:  # argparse (--help, usage errors) and Lightning's own exits
        return err.code if isinstance(err.code, int) else (0 if err.code is None else USAGE_ERROR)
    except BaseException as err:  # noqa: BLE001 - the point of this function
        bad_input = isinstance(err, BAD_INPUT)
        what = "error" if bad_input else f"unexpected error ({type(err).__name__})"
        print(f"{prog}: {what}: {describe(err)}", file=sys.stderr)
        if not isinstance(err, argparse.ArgumentError):  # a usage error has no interesting traceback
                print(f"(run again with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the full traceback"
                  f"{'' if bad_input else '; please report it'})", file=sys.stderr)
        return USAGE_ERROR if bad_input else 1


def describe(err: BaseException) -> str:
    """One paragraph for ``err``: jsonargparse's nested Union reports are reduced to their reasons,
    an unknown class_path lists what is available, an unknown option lists the accepted ones."""
    text = str(err) or type(err).__name__
    if "Parser key" in text or "Does not validate against any of the Union subtypes" in text:
        text = _summarise_jsonargparse(text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 5] + " ..."


def _summarise_jsonargparse(text: str) -> str:
    key = re.search(r'Parser key "([^"]+)"', text)
    reasons: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        item = line.strip()
        if not item.startswith("- "):
            continue
        item = item[2:].strip()
        if item.startswith("Does not validate"):
            continue
        problem = re.match(r"Problem with given class_path '([^']+)':?", item)
        if problem:
            detail = lines[i + 1].strip() if i + 1 < len(lines) else ""
            reasons.append(_class_path_problem(problem.group(1), detail))
        else:
            reasons.append(item)
    if not reasons:  # a plain one-line jsonargparse error, e.g. a missing config file
        first = text.strip().splitlines()[0]
        rest = " ".join(l.strip() for l in text.strip().splitlines()[1:]
                        if l.strip() and not l.strip().startswith(("Given value", "Subtypes")))
        return f"{first} {rest}".strip()
    # "Expected a <class 'float'>" lines are the other members of a Union the value was tried
    # against; they only matter when nothing more specific was said.
    specific = [r for r in reasons if not r.startswith("Expected a <class")]
    where = f"{key.group(1)}: " if key else ""
    return where + "; ".join(dict.fromkeys(specific or reasons))


def _class_path_problem(class_path: str, detail: str) -> str:
    module_name, _, name = class_path.rpartition(".")
    cls = None
    try:
        cls = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        pass
    if cls is None:
        return (f"unknown class_path {class_path!r} ({detail.rstrip('.')}); available regularizers "
                f"(class_path interp_train.regularizers.<module>.<class>): {', '.join(available_regularizers())}")
    option = re.search(r"Option '([^']+)' is not accepted", detail)
    if option:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        return f"{cls.__name__} does not accept {option.group(1)!r}; it accepts: {', '.join(accepted)}"
    return f"{class_path}: {detail}"


def available_regularizers() -> list[str]:
    """``<module>.<class>`` of the regularizers shipped in interp_train.regularizers."""
    import interp_train.regularizers as regs
    from interp_train.regularizers.base import Regularizer

    found = {f"{obj.__module__.rpartition('.')[2]}.{obj.__name__}" for obj in vars(regs).values()
             if inspect.isclass(obj) and issubclass(obj, Regularizer) and obj is not Regularizer
             and not inspect.isabstract(obj)}
    return sorted(found)
