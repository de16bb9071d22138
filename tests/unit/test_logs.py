"""Log lines carry the request id, as text or as JSON."""

import json
import logging

import pytest

from fleetserve.telemetry.logs import configure_logging
from fleetserve.telemetry.tracing import request_id_var


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_request_id(restore_root, capsys):
    configure_logging("INFO", "json")
    token = request_id_var.set("req-42")
    try:
        logging.getLogger("fleetserve.test").info("hello %s", "there")
    finally:
        request_id_var.reset(token)
    logging.getLogger("fleetserve.test").warning("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["request_id"] == "req-42" and lines[0]["message"] == "hello there"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "fleetserve.test" and lines[0]["time"].endswith("Z")
    assert lines[1]["request_id"] == "-"


def test_text_lines_carry_the_request_id(restore_root, capsys):
    configure_logging("WARNING", "text")
    token = request_id_var.set("abc")
    try:
        logging.getLogger("x").warning("careful")
    finally:
        request_id_var.reset(token)
    assert "[abc]: careful" in capsys.readouterr().err
    with pytest.raises(ValueError):
        configure_logging("INFO", "xml")
