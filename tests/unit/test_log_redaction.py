"""No secret reaches a log line, at any level, from aiokafka or from LHV."""

from __future__ import annotations

import logging

import pytest
from aiokafka.protocol.admin import SaslAuthenticateRequest

from worker.telemetry.logs import install_redaction, setup_logging

PASSWORD = "pl41n-pa55word"


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiokafka").level)
    yield None
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("aiokafka").setLevel(saved[2])


def test_sasl_payload_in_aiokafka_request_lines_is_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_redaction()
    request = SaslAuthenticateRequest(f"user\x00user\x00{PASSWORD}".encode()).prepare({36: (0, 1)})
    with caplog.at_level(logging.DEBUG, logger="aiokafka.conn"):
        logging.getLogger("aiokafka.conn").debug(
            "Request to %s:%d %d: %s", "127.0.0.1", 9092, 3, request
        )
    [line] = [r.getMessage() for r in caplog.records if r.name == "aiokafka.conn"]
    assert PASSWORD not in line
    assert "SaslAuthenticateRequest_v1(sasl_auth_bytes=<" in line and "redacted>" in line


def test_a_registered_password_is_masked_in_any_line_of_the_lhv_handler(
    restore_logging: object, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("DEBUG")
    install_redaction(PASSWORD)
    logging.getLogger("somewhere.else").info("connecting with %s", PASSWORD)
    err = capsys.readouterr().err
    assert "connecting with ***" in err and PASSWORD not in err


def test_debug_keeps_aiokafka_at_warning_unless_the_wire_flag_asks(
    restore_logging: object,
) -> None:
    setup_logging("DEBUG", kafka_wire=False)
    assert logging.getLogger("aiokafka").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("worker").getEffectiveLevel() == logging.DEBUG
    setup_logging("DEBUG", kafka_wire=True)
    assert logging.getLogger("aiokafka").getEffectiveLevel() == logging.DEBUG


def test_per_connection_sasl_lines_are_dropped_without_the_wire_flag(
    restore_logging: object, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", kafka_wire=False)
    conn = logging.getLogger("aiokafka.conn")
    conn.warning("Sending username and password in the clear")
    conn.warning("Authenticated as %s via %s", "alice", "PLAIN")
    assert capsys.readouterr().err == ""
