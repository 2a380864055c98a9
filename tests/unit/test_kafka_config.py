"""Kafka settings are checked when built: each mistake is one error naming the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.dev.stack import make_tls_files
from worker.kafka.config import KafkaConfig
from worker.kafka.errors import KafkaSettingsError


def test_username_under_sasl_without_mechanism_uses_plain() -> None:
    config = KafkaConfig.from_env(
        {
            "LHV_SECURITY_PROTOCOL": "sasl_plaintext",
            "LHV_SASL_USERNAME": "alice",
            "LHV_SASL_PASSWORD": "pw",
        }
    )
    assert config.security_protocol == "SASL_PLAINTEXT"
    assert config.sasl_mechanism == "PLAIN"
    assert config.client_kwargs()["sasl_plain_username"] == "alice"


def test_username_without_a_sasl_protocol_is_refused_not_dropped() -> None:
    with pytest.raises(KafkaSettingsError, match=r"LHV_SASL_USERNAME .*SASL_PLAINTEXT or SASL_SSL"):
        KafkaConfig.from_env({"LHV_SASL_USERNAME": "alice", "LHV_SASL_PASSWORD": "pw"})


USER = {"LHV_SASL_USERNAME": "alice", "LHV_SASL_PASSWORD": "pw"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LHV_SECURITY_PROTOCOL": "SASL"}, "LHV_SECURITY_PROTOCOL='SASL' is not one of"),
        (
            {"LHV_SECURITY_PROTOCOL": "SASL_SSL", "LHV_SASL_MECHANISM": "GSSAPI", **USER},
            "LHV_SASL_MECHANISM='GSSAPI' is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        (
            {"LHV_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "LHV_SASL_USERNAME": "alice"},
            "needs LHV_SASL_PASSWORD",
        ),
        (
            {"LHV_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "LHV_SSL_CAFILE": "/etc/hosts", **USER},
            "LHV_SSL_CAFILE set, but LHV_SECURITY_PROTOCOL=SASL_PLAINTEXT does not use TLS",
        ),
        (
            {"LHV_SECURITY_PROTOCOL": "SSL", "LHV_SSL_CAFILE": "/nonexistent/ca.pem"},
            "LHV_SSL_CAFILE=/nonexistent/ca.pem: no such file",
        ),
        (
            {"LHV_SECURITY_PROTOCOL": "SSL", "LHV_SSL_CAFILE": "/etc/hostname"},
            "does not load as PEM certificates",
        ),
    ],
)
def test_each_mistake_is_refused_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(KafkaSettingsError, match=re.escape(message)):
        KafkaConfig.from_env(env)


def test_encrypted_client_key_loads_with_ssl_password_only(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    env = {
        "LHV_SECURITY_PROTOCOL": "SSL",
        "LHV_SSL_CAFILE": str(tls.ca),
        "LHV_SSL_CERTFILE": str(tls.client_cert),
        "LHV_SSL_KEYFILE": str(tls.client_key),
    }
    with pytest.raises(KafkaSettingsError, match="LHV_SSL_PASSWORD"):
        KafkaConfig.from_env(env)
    with pytest.raises(KafkaSettingsError, match="do not load"):
        KafkaConfig.from_env({**env, "LHV_SSL_PASSWORD": "not-the-password"})
    config = KafkaConfig.from_env({**env, "LHV_SSL_PASSWORD": tls.client_key_password})
    assert config.client_kwargs()["ssl_context"] is not None


def test_passwords_stay_out_of_the_repr(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    config = KafkaConfig(
        security_protocol="SASL_SSL",
        sasl_plain_username="alice",
        sasl_plain_password="sasl-secret",
        ssl_cafile=str(tls.ca),
        ssl_certfile=str(tls.client_cert),
        ssl_keyfile=str(tls.client_key),
        ssl_password=tls.client_key_password,
    )
    text = repr(config)
    assert "alice" in text
    assert "sasl-secret" not in text and tls.client_key_password not in text
