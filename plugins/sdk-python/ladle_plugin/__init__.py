"""Write a ladle filter plugin in Python.

A filter is a function of one record (a dict) and the stage's `config` table (a dict):

    import ladle_plugin

    @ladle_plugin.filter
    def keep(record, config):
        return len(record["caption"].split()) >= config.get("min_words", 3)

    Filter = ladle_plugin.Filter   # what componentize-py builds the component from

It answers True to keep the record, False or None to drop it, or a dict to keep that record
instead (a cleaned caption, an added field). For more control:

- `@ladle_plugin.configure`: called once per instance with the config dict, before any record;
  raise to refuse a config (the stage fails with your message before it reads anything).
- `@ladle_plugin.batch`: a function of (records, config) returning one answer per record, for
  filters that look at a batch at once (a vectorized rule, a per-batch cache).
- `ladle_plugin.log(message, level="info")`: a line in the stage's log.

An exception raised by your code becomes the plugin's error, with the last lines of the Python
traceback: the stage fails naming the records of the batch (or, with `on_error = "drop"`,
drops them and counts them).

The sandbox is ladle's: no files, network, environment or clock (time.time() is 0), randomness
seeded per batch, a memory cap and a deadline per batch. CPython itself needs a few tens of MiB;
see plugins/README.md for the limits to give a Python plugin.
"""

import json
import traceback

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.filter import Verdict_Drop, Verdict_Keep, Verdict_Replace
from wit_world.imports import host

__all__ = ["Filter", "batch", "configure", "filter", "log"]

_hooks = {"filter": None, "batch": None, "configure": None}
_config = {}


def _register(kind, fn):
    if not callable(fn):
        raise TypeError(f"@ladle_plugin.{kind} decorates a function, not {type(fn).__name__}")
    if _hooks[kind] is not None and _hooks[kind] is not fn:
        raise RuntimeError(f"two functions are decorated with @ladle_plugin.{kind}; keep one")
    _hooks[kind] = fn
    return fn


def filter(fn):
    """Registers `fn(record: dict, config: dict) -> bool | dict | None` as the filter."""
    return _register("filter", fn)


def batch(fn):
    """Registers `fn(records: list[dict], config: dict) -> list[bool | dict | None]`."""
    return _register("batch", fn)


def configure(fn):
    """Registers `fn(config: dict) -> None`, called once before any record."""
    return _register("configure", fn)


_LEVELS = {"debug": host.Level.DEBUG, "info": host.Level.INFO, "warn": host.Level.WARN, "error": host.Level.ERROR}


def log(message, level="info"):
    """A line for the stage's log: level is debug, info, warn or error."""
    if level not in _LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(_LEVELS)}")
    host.log(_LEVELS[level], str(message))


def _verdict(answer, position):
    if answer is True:
        return Verdict_Keep()
    if answer is False or answer is None:
        return Verdict_Drop()
    if isinstance(answer, dict):
        return Verdict_Replace(json.dumps(answer, ensure_ascii=False, separators=(",", ":")))
    raise TypeError(
        f"record {position} of the batch: a filter answers True (keep), False or None (drop) or a dict "
        f"(the record to keep instead), not {type(answer).__name__}"
    )


def _error(exc, lines=8):
    """The plugin's error for `exc`: the last lines of its traceback."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return Err("\n".join(text.splitlines()[-lines:]))


class Filter(exports.Filter):
    """The component's export: hands ladle's calls to the decorated functions."""

    def configure(self, config):
        global _config
        try:
            _config = json.loads(config) if config else {}
            if _hooks["configure"] is not None:
                _hooks["configure"](_config)
        except Exception as exc:
            raise _error(exc)

    def filter(self, batch):
        try:
            records = [json.loads(text) for text in batch]
            if _hooks["batch"] is not None:
                answers = list(_hooks["batch"](records, _config))
                if len(answers) != len(records):
                    raise ValueError(f"@ladle_plugin.batch answered {len(answers)} times for {len(records)} records")
            elif _hooks["filter"] is not None:
                rule = _hooks["filter"]
                answers = [rule(record, _config) for record in records]
            else:
                raise RuntimeError("no filter: decorate a function with @ladle_plugin.filter (or @ladle_plugin.batch)")
            return [_verdict(answer, i) for i, answer in enumerate(answers)]
        except Exception as exc:
            raise _error(exc)
