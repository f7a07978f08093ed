"""Tests for `workflow.core.timing` and `workflow.core.log_setup`."""

from __future__ import annotations

import io
import json
import logging

import pytest

from workflow.core.exceptions import ConfigError
from workflow.core.log_setup import configure_logging, parse_log_levels
from workflow.core.timing import timed


def test_timed_records_and_logs_on_timer_logger(caplog):
    caplog.set_level(logging.DEBUG, logger="timer.prep")
    with timed("prep", detector=4) as record:
        sum(range(200_000))
    assert record.wall_s > 0 and record.cpu_s > 0
    (message,) = [r for r in caplog.records if r.name == "timer.prep"]
    assert "prep took" in message.getMessage() and "detector=4" in message.getMessage()


def test_timed_records_even_when_the_stage_fails():
    with pytest.raises(RuntimeError):
        with timed("ingest") as record:
            raise RuntimeError("boom")
    assert record.wall_s >= 0


def test_parse_log_levels():
    assert parse_log_levels("workflow=info timer=DEBUG") == {"workflow": "INFO", "timer": "DEBUG"}
    with pytest.raises(ConfigError, match="item 'timer:DEBUG'"):
        parse_log_levels("timer:DEBUG")


def test_json_logs_carry_context_fields():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("prompt_test=DEBUG", json_lines=True, stream=stream)
        logging.getLogger("prompt_test").debug("hello %s", "x", extra={"group": "G1", "detector": 3})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logging.getLogger("prompt_test").setLevel(logging.NOTSET)
    line = json.loads(stream.getvalue().strip())
    assert (line["message"], line["group"], line["detector"], line["level"]) == ("hello x", "G1", 3, "DEBUG")
