"""Kafka connection failures become one line naming the cause and the setting to check."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import pytest
from aiokafka import errors as ak

from worker.cli import main
from worker.kafka.config import KafkaConfig
from worker.kafka.errors import (
    KafkaAuthFailed,
    KafkaConnectError,
    KafkaProtocolMismatch,
    KafkaTlsFailed,
    map_kafka_errors,
    translate,
)

SASL = KafkaConfig(
    bootstrap_servers="127.0.0.1:9093",
    security_protocol="SASL_PLAINTEXT",
    sasl_mechanism="SCRAM-SHA-256",
    sasl_plain_username="alice",
    sasl_plain_password="s3cret-pw",
)
BOOTSTRAP_FAILED = ak.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9093)]")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_password_names_user_and_mechanism_and_exits_4() -> None:
    cause = ak.SaslAuthenticationFailed("Authentication failed: Invalid username or password")
    err = translate(BOOTSTRAP_FAILED, SASL, [("127.0.0.1:9093", cause)])
    assert isinstance(err, KafkaAuthFailed) and err.exit_code == 4
    assert "user 'alice' via SCRAM-SHA-256 at 127.0.0.1:9093" in str(err)
    assert "Invalid username or password" in str(err) and "LHV_SASL_PASSWORD" in str(err)
    assert "s3cret-pw" not in str(err)


def test_refused_connection_says_nothing_listens_and_exits_3() -> None:
    cause = ConnectionRefusedError(111, "Connect call failed")
    err = translate(BOOTSTRAP_FAILED, SASL, [("127.0.0.1:9093", cause)])
    assert type(err) is KafkaConnectError and err.exit_code == 3
    assert "nothing listening at 127.0.0.1:9093" in str(err)
    assert "LHV_BOOTSTRAP_SERVERS" in str(err)


def test_a_refusal_explains_a_bootstrap_failure_better_than_a_refused_port() -> None:
    causes: list[tuple[str, BaseException]] = [
        ("10.0.0.1:9093", ConnectionRefusedError(111, "refused")),
        ("10.0.0.2:9093", ak.SaslAuthenticationFailed("bad password")),
    ]
    assert isinstance(translate(BOOTSTRAP_FAILED, SASL, causes), KafkaAuthFailed)


def test_untrusted_broker_certificate_names_the_ca_file(tmp_path: pytest.TempPathFactory) -> None:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "self-signed certificate in certificate chain"
    err = translate(BOOTSTRAP_FAILED, None, [("127.0.0.1:9094", cause)])
    assert isinstance(err, KafkaTlsFailed) and err.exit_code == 4
    assert "self-signed certificate" in str(err) and "LHV_SSL_CAFILE" in str(err)


def test_tls_alert_behind_a_closed_connection_blames_the_client_certificate() -> None:
    alert = ssl.SSLError(1, "sslv3 alert bad certificate")
    alert.reason = "SSLV3_ALERT_BAD_CERTIFICATE"
    closed = ak.KafkaConnectionError("Connection at 127.0.0.1:9094 closed")
    closed.__cause__ = alert
    err = translate(BOOTSTRAP_FAILED, None, [("127.0.0.1:9094", closed)])
    assert isinstance(err, KafkaTlsFailed)
    assert "client certificate" in str(err) and "LHV_SSL_CERTFILE" in str(err)


def test_connection_closed_in_the_handshake_is_a_protocol_mismatch() -> None:
    closed = ak.KafkaConnectionError("Connection at 127.0.0.1:9093 closed")
    closed.__cause__ = asyncio.IncompleteReadError(b"", 4)
    err = translate(BOOTSTRAP_FAILED, SASL, [("127.0.0.1:9093", closed)])
    assert isinstance(err, KafkaProtocolMismatch)
    assert "protocol mismatch?" in str(err) and "SASL_PLAINTEXT" in str(err)


def test_sasl_handshake_on_a_plaintext_listener_is_a_protocol_mismatch() -> None:
    err = translate(BOOTSTRAP_FAILED, SASL, [("127.0.0.1:9092", ak.IllegalSaslStateError())])
    assert isinstance(err, KafkaProtocolMismatch)


def test_errors_that_are_not_about_the_connection_pass_through() -> None:
    assert translate(ak.CommitFailedError("rebalanced"), SASL) is None
    # an OSError raised next to a Kafka start (S3's, say) is not Kafka's to explain
    assert translate(ConnectionRefusedError(111, "refused"), SASL) is None
    with pytest.raises(ValueError), map_kafka_errors(SASL):
        raise ValueError("not ours")


def test_map_kafka_errors_uses_the_cause_aiokafka_logged_and_chains_the_original() -> None:
    cause = ak.SaslAuthenticationFailed("Authentication failed")
    with pytest.raises(KafkaAuthFailed) as info, map_kafka_errors(SASL):
        logging.getLogger("aiokafka").error(
            'Unable connect to "%s:%s": %s', "127.0.0.1", 9093, cause
        )
        raise BOOTSTRAP_FAILED
    assert info.value.__cause__ is BOOTSTRAP_FAILED
    assert "at 127.0.0.1:9093" in str(info.value)


def test_connect_failures_are_held_back_and_logged_if_the_start_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiokafka"), map_kafka_errors(SASL):
        logging.getLogger("aiokafka").error(
            'Unable connect to "%s:%s": %s', "10.0.0.1", 9093, ConnectionRefusedError(111, "x")
        )
        assert not [r for r in caplog.records if r.name == "aiokafka"]
    assert [r.getMessage() for r in caplog.records if r.name == "aiokafka"] == [
        'Unable connect to "10.0.0.1:9093": [Errno 111] x'
    ]


def test_cli_prints_one_line_and_exit_3_when_nothing_listens(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = _closed_port()
    code = main(["stats", "docs", "--bootstrap-servers", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 3
    assert err.splitlines() == [
        f"lhv stats: nothing listening at 127.0.0.1:{port} (connection refused): is the "
        "stack env sourced? check LHV_BOOTSTRAP_SERVERS"
    ]


def test_cli_prints_one_line_and_exit_2_for_a_bad_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LHV_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("LHV_SASL_MECHANISM", "SCRAM-SHA-1")
    code = main(["stats", "docs", "--bootstrap-servers", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and "LHV_SASL_MECHANISM='SCRAM-SHA-1'" in err
