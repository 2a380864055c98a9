"""How to reach Kafka: `KafkaConfig`, checked at start, shared by the client and the worker."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker._environ import _env
from worker.kafka.errors import KafkaSettingsError
from worker.telemetry.logs import install_redaction

__all__ = ["DEFAULT_SASL_MECHANISM", "SASL_MECHANISMS", "SECURITY_PROTOCOLS", "KafkaConfig"]


#: the security protocols aiokafka speaks
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: the SASL mechanisms a username and password can drive (GSSAPI and OAUTHBEARER need
#: more than a password, which these settings do not carry)
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: the mechanism used when a username is given without one
DEFAULT_SASL_MECHANISM = "PLAIN"


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    """How to reach Kafka, checked when built: every mistake a broker would only report
    as "Unable to bootstrap" is refused here with the setting to fix.

    Names are normalised (`sasl_ssl` is `SASL_SSL`); a username under a SASL protocol
    without a mechanism gets `PLAIN`. Passwords stay out of reprs and logs.

    Raises:
        KafkaSettingsError: an unknown protocol or mechanism, SASL settings under a
            protocol without SASL (or missing under one with it), TLS files under a
            protocol without TLS, a file that is missing or unreadable, a key that does
            not load (wrong `LHV_SSL_PASSWORD`?).
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "lhv"
    security_protocol: str = "PLAINTEXT"
    """`LHV_SECURITY_PROTOCOL`: one of `SECURITY_PROTOCOLS`."""
    sasl_mechanism: str | None = None
    """`LHV_SASL_MECHANISM`: one of `SASL_MECHANISMS`; PLAIN when a username is given."""
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    """CA bundle (PEM) that signed the brokers' certificates; None: the system's."""
    ssl_certfile: str | None = None
    """Client certificate (PEM), for listeners that require one."""
    ssl_keyfile: str | None = None
    """The client certificate's key (PEM); None when it is in `ssl_certfile`."""
    ssl_password: str | None = field(default=None, repr=False)
    """`LHV_SSL_PASSWORD`: decrypts an encrypted `ssl_keyfile`."""
    request_timeout_ms: int = 30_000

    def __post_init__(self) -> None:
        protocol = self.security_protocol.strip().upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise KafkaSettingsError(
                f"LHV_SECURITY_PROTOCOL={self.security_protocol!r} is not one of "
                f"{', '.join(SECURITY_PROTOCOLS)}"
            )
        object.__setattr__(self, "security_protocol", protocol)
        if not self.bootstrap_servers.strip():
            raise KafkaSettingsError("LHV_BOOTSTRAP_SERVERS is empty")
        if self.request_timeout_ms <= 0:
            raise KafkaSettingsError("request_timeout_ms must be > 0")
        self._check_sasl()
        self._check_tls()

    def _check_sasl(self) -> None:
        given = [
            name
            for name, value in (
                ("LHV_SASL_MECHANISM", self.sasl_mechanism),
                ("LHV_SASL_USERNAME", self.sasl_plain_username),
                ("LHV_SASL_PASSWORD", self.sasl_plain_password),
            )
            if value
        ]
        if not self.uses_sasl:
            if given:
                raise KafkaSettingsError(
                    f"{' and '.join(given)} set, but LHV_SECURITY_PROTOCOL="
                    f"{self.security_protocol} does not authenticate: use SASL_PLAINTEXT or "
                    "SASL_SSL, or unset them"
                )
            return
        mechanism = (self.sasl_mechanism or DEFAULT_SASL_MECHANISM).strip().upper()
        if mechanism not in SASL_MECHANISMS:
            raise KafkaSettingsError(
                f"LHV_SASL_MECHANISM={self.sasl_mechanism!r} is not one of "
                f"{', '.join(SASL_MECHANISMS)}"
            )
        object.__setattr__(self, "sasl_mechanism", mechanism)
        missing = [
            name
            for name, value in (
                ("LHV_SASL_USERNAME", self.sasl_plain_username),
                ("LHV_SASL_PASSWORD", self.sasl_plain_password),
            )
            if not value
        ]
        if missing:
            raise KafkaSettingsError(
                f"LHV_SECURITY_PROTOCOL={self.security_protocol} with {mechanism} needs "
                f"{' and '.join(missing)}"
            )

    def _check_tls(self) -> None:
        files = {
            "LHV_SSL_CAFILE": self.ssl_cafile,
            "LHV_SSL_CERTFILE": self.ssl_certfile,
            "LHV_SSL_KEYFILE": self.ssl_keyfile,
        }
        given = [name for name, value in files.items() if value]
        if self.ssl_password:
            given.append("LHV_SSL_PASSWORD")
        if not self.uses_tls:
            if given:
                raise KafkaSettingsError(
                    f"{' and '.join(given)} set, but LHV_SECURITY_PROTOCOL="
                    f"{self.security_protocol} does not use TLS: use SSL or SASL_SSL, or "
                    "unset them"
                )
            return
        for name, path in files.items():
            if path and not os.path.isfile(path):
                raise KafkaSettingsError(f"{name}={path}: no such file")
            if path and not os.access(path, os.R_OK):
                raise KafkaSettingsError(f"{name}={path}: not readable by this user")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise KafkaSettingsError("LHV_SSL_KEYFILE is set without LHV_SSL_CERTFILE")
        if self.ssl_password and not self.ssl_certfile:
            raise KafkaSettingsError("LHV_SSL_PASSWORD is set without LHV_SSL_CERTFILE")
        self.ssl_context()  # a CA or key that does not load fails now, not at connect

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context from the CA, certificate, key and key password.

        Raises:
            KafkaSettingsError: a file is not PEM, or the key does not match the
                certificate or does not decrypt with `ssl_password`.
        """
        from aiokafka.helpers import create_ssl_context

        try:
            context: ssl.SSLContext = create_ssl_context(cafile=self.ssl_cafile)
        except ssl.SSLError as exc:
            raise KafkaSettingsError(
                f"LHV_SSL_CAFILE={self.ssl_cafile} does not load as PEM certificates "
                f"({exc.reason or exc})"
            ) from exc
        if self.ssl_certfile:
            # never OpenSSL's fallback, which prompts on the terminal for a key's password
            password: str | Callable[[], bytes] = self.ssl_password or (lambda: b"")
            try:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
            except ssl.SSLError as exc:
                key = self.ssl_keyfile or self.ssl_certfile
                raise KafkaSettingsError(
                    f"the client certificate {self.ssl_certfile} and key {key} do not load "
                    f"({exc.reason or exc}): is the key encrypted (LHV_SSL_PASSWORD) and does "
                    "it match the certificate?"
                ) from exc
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's consumer, producer and admin client."""
        install_redaction(self.sasl_plain_password, self.ssl_password)
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.uses_sasl:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_plain_username
            kw["sasl_plain_password"] = self.sasl_plain_password
        if self.uses_tls:
            kw["ssl_context"] = self.ssl_context()
        return kw

    def consumer_kwargs(self) -> dict[str, Any]:
        """`client_kwargs` for a consumer of the commands or search topic: it reads
        committed records only (`read_committed`). A transactional producer's records are
        read once its transaction commits, and never when it aborts: an aborted `add`
        is not applied, an aborted query not answered."""
        return {**self.client_kwargs(), "isolation_level": "read_committed"}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> KafkaConfig:
        return cls(
            bootstrap_servers=_env(env, "LHV_BOOTSTRAP_SERVERS", "127.0.0.1:9092") or "",
            client_id=_env(env, "LHV_CLIENT_ID", "lhv") or "lhv",
            security_protocol=_env(env, "LHV_SECURITY_PROTOCOL", "PLAINTEXT") or "PLAINTEXT",
            sasl_mechanism=_env(env, "LHV_SASL_MECHANISM"),
            sasl_plain_username=_env(env, "LHV_SASL_USERNAME"),
            sasl_plain_password=_env(env, "LHV_SASL_PASSWORD"),
            ssl_cafile=_env(env, "LHV_SSL_CAFILE"),
            ssl_certfile=_env(env, "LHV_SSL_CERTFILE"),
            ssl_keyfile=_env(env, "LHV_SSL_KEYFILE"),
            ssl_password=_env(env, "LHV_SSL_PASSWORD"),
        )
