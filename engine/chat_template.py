"""Chat templates rendered as Hugging Face renders them, and bounded in time, work and output.

transformers renders a checkpoint's Jinja template in an ImmutableSandboxedEnvironment with trim_blocks,
lstrip_blocks and the loop-controls extension, `tojson` that keeps non-ASCII text as it is, and the globals
`raise_exception` and `strftime_now`. We do the same, so that a template renders here as it does there.

A template comes with a downloaded file: it is untrusted code. The sandbox keeps it from the file system and
from Python's internals, but not from looping: a GGUF whose template looped grew past 12 GB. So every render
has a budget: `range` counts its items against one total, every call the template makes is counted and
timed, `*` and `**` may not build huge values, and the output may not outgrow what it was given.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

MAX_SECONDS = 10.0
MAX_STEPS = 2_000_000  # range items + calls, across one render
MAX_VALUE = 1 << 22  # characters or items that one `*` may build
MEMORY_HEADROOM = 256 << 20  # bytes of address space a render may add (beyond 8x the messages' text)


class TemplateError(ValueError):
    """The chat template failed or ran out of its budget: one line for the user."""


class _Budget:
    def __init__(self, max_output: int):
        self.deadline = time.monotonic() + MAX_SECONDS
        self.steps = 0
        self.max_output = max_output

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise TemplateError(f"chat template took more than {MAX_STEPS:,} steps: it loops")
        if self.steps % 1024 == 0 or n > 1:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template ran longer than {MAX_SECONDS:.0f} s")


class _BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**"])

    budget: _Budget | None = None

    def call(self, context, obj, /, *args, **kwargs):
        if self.budget is not None:
            self.budget.step()
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateError("chat template raises a number to a huge power")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_VALUE:
                    raise TemplateError("chat template builds a huge value with *")
        return super().call_binop(context, operator, left, right)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own: non-ASCII text kept, no HTML escaping (Jinja's built-in tojson escapes <, >, &, ')
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(f"chat template: {message}")


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


class ChatTemplate:
    def __init__(self, source: str):
        self.env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[jinja2.ext.loopcontrols])
        self.env.filters["tojson"] = _tojson
        self.env.globals["raise_exception"] = _raise_exception
        self.env.globals["strftime_now"] = _strftime_now
        self.env.globals["range"] = self._range
        try:
            self.template = self.env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template does not parse ({e})") from None
        except RecursionError:
            raise TemplateError("chat template nests too deeply to parse") from None

    def _range(self, *args):
        items = range(*args)
        budget = self.env.budget
        if budget is not None:
            budget.step(max(1, len(items)))
        return items

    def render(self, **context) -> str:
        given = sum(len(str(m.get("content", ""))) for m in context.get("messages", []) if isinstance(m, dict))
        self.env.budget = _Budget(max_output=4 * given + (1 << 20))
        try:
            with _address_space_limit(MEMORY_HEADROOM + 8 * given):
                return self._render(context)
        except TemplateError:
            raise
        except RecursionError:
            raise TemplateError("chat template recurses without end") from None
        except MemoryError:
            raise TemplateError("chat template ran out of memory") from None
        except Exception as e:  # noqa: BLE001 (a template can raise anything Jinja or Python can)
            raise TemplateError(f"chat template failed ({type(e).__name__}: {str(e)[:200]})") from None
        finally:
            self.env.budget = None

    def _render(self, context: dict) -> str:
        budget, pieces, size = self.env.budget, [], 0
        for piece in self.template.generate(**context):
            size += len(piece)
            if size > budget.max_output:
                raise TemplateError(f"chat template output passed {budget.max_output:,} characters: it loops")
            budget.check_time()
            pieces.append(piece)
        return "".join(pieces)


@contextlib.contextmanager
def _address_space_limit(headroom: int):
    """While rendering, the process may not map more than `headroom` more bytes: a template that builds a
    huge string with `~` (which Jinja's sandbox cannot intercept) gets a MemoryError, not the machine's
    memory. Linux only; elsewhere the step, output and value bounds still hold."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = mapped + headroom
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft != resource.RLIM_INFINITY and soft < limit:
            limit = soft
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
