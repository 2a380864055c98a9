"""Kafka connection and authentication failures, translated once into one clear line.

aiokafka reports a broker that refuses a password, a certificate or the protocol the same
way as a broker that is not there: it logs the real cause while it tries each bootstrap
server and then raises `KafkaConnectionError("Unable to bootstrap from ...")`. In the
spirit of httpx's `map_httpcore_exceptions`, `map_kafka_errors()` wraps the start of every
Kafka client LHV builds (the worker's, `LhvClient`'s, the tools'): it keeps the causes
aiokafka logs inside it and, when the start fails, raises the most specific error below,
`from` the original, naming the cause and the setting to check. The `lhv` command prints
that one line and exits with the class's `exit_code` (the traceback only at DEBUG).

    KafkaSetupError                   exit  Kafka cannot be used as configured
    ├── KafkaSettingsError (ValueError)  2  a setting is invalid (found before connecting)
    ├── KafkaTopicError                  2  a topic named by the settings is missing or unusable
    └── KafkaConnectError                3  no connection (nothing listening, no answer)
        └── KafkaRefused                 4  the broker refused this connection's settings
            ├── KafkaAuthFailed          4  SASL user, password or mechanism refused
            ├── KafkaTlsFailed           4  certificate verification, client certificate
            └── KafkaProtocolMismatch    4  the listener speaks another security protocol

These are not `LhvError`s: that tree is the wire codes of replies, and a connection that
never opened has nothing to reply to. Exit 3 may pass by itself (a broker that is still
starting); exit 4 needs a change of settings.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, ClassVar

from aiokafka import errors as kafka_errors

if TYPE_CHECKING:
    from worker.kafka.config import KafkaConfig

__all__ = [
    "KafkaAuthFailed",
    "KafkaConnectError",
    "KafkaProtocolMismatch",
    "KafkaRefused",
    "KafkaSettingsError",
    "KafkaSetupError",
    "KafkaTlsFailed",
    "KafkaTopicError",
    "map_kafka_errors",
    "translate",
]

log = logging.getLogger(__name__)


class KafkaSetupError(Exception):
    """Kafka cannot be used as configured; the message names the cause and the setting."""

    exit_code: ClassVar[int] = 3


class KafkaSettingsError(KafkaSetupError, ValueError):
    """A Kafka setting is invalid; raised by `KafkaConfig` before anything connects."""

    exit_code = 2


class KafkaTopicError(KafkaSetupError):
    """A topic the settings name does not exist on the cluster (a typo, or topics not
    created yet), or the command and search topics differ in partitions."""

    exit_code = 2


class KafkaConnectError(KafkaSetupError):
    """No connection: nothing listens at the bootstrap address, or nothing answers."""

    exit_code = 3


class KafkaRefused(KafkaConnectError):
    """The broker answered but refused this connection's security settings."""

    exit_code = 4


class KafkaAuthFailed(KafkaRefused):
    """SASL authentication failed: user, password, or mechanism not enabled."""


class KafkaTlsFailed(KafkaRefused):
    """The TLS handshake failed: the broker's certificate or the client's."""


class KafkaProtocolMismatch(KafkaRefused):
    """The connection closed during the handshake: the listener expects another protocol."""


# --------------------------------------------------------------------------------------
# causes aiokafka logs instead of raising


class _Held:
    """The records aiokafka's client logged inside one `map_kafka_errors` block."""

    __slots__ = ("causes", "records")

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.causes: list[tuple[str, BaseException]] = []


_held: ContextVar[_Held | None] = ContextVar("lhv_kafka_held", default=None)


class _HoldConnectFailures(logging.Filter):
    """On aiokafka's client logger. Inside `map_kafka_errors`, aiokafka's "Unable connect to ..." lines (one per failed
    bootstrap server, with the real cause as the last argument) are held back: they become
    the one line of the error, or are logged after all if the start succeeds."""

    def filter(self, record: logging.LogRecord) -> bool:
        held = _held.get()
        if held is None or not isinstance(record.args, tuple):
            return True
        causes = [a for a in record.args if isinstance(a, BaseException)]
        if not causes:
            return True
        where = (
            f"{record.args[0]}:{record.args[1]}"
            if len(record.args) >= 3 and not isinstance(record.args[1], BaseException)
            else ""
        )
        held.records.append(record)
        held.causes.append((where, causes[-1]))
        return False


_holder = _HoldConnectFailures()
logging.getLogger("aiokafka").addFilter(_holder)  # aiokafka.client logs as "aiokafka"


@contextmanager
def map_kafka_errors(config: KafkaConfig | None = None) -> Iterator[None]:
    """Translate aiokafka's connection failures inside the block (see the module doc).

    Wrap the start of clients, not their whole life: inside the block aiokafka's
    connection-failure lines are held until the block ends. Errors that are not about
    the connection pass through unchanged.

    Raises:
        KafkaConnectError: (or a subclass) chained `from` aiokafka's error.
    """
    held = _Held()
    token = _held.set(held)
    try:
        yield
    except KafkaSetupError:
        raise
    except Exception as exc:
        mapped = translate(exc, config, held.causes)
        if mapped is None:
            raise
        for record in held.records:
            log.debug("while connecting: %s", record.getMessage())
        held.records.clear()
        raise mapped from exc
    finally:
        _held.reset(token)
        for record in held.records:  # the start went on and succeeded: they were warnings
            logging.getLogger(record.name).handle(record)


def translate(
    exc: BaseException,
    config: KafkaConfig | None,
    causes: list[tuple[str, BaseException]] | None = None,
) -> KafkaConnectError | None:
    """The `KafkaConnectError` for `exc` (with the `causes` aiokafka logged before it,
    as `(host:port, error)`), or None when neither is about a Kafka connection."""
    candidates = list(causes or [])
    if isinstance(exc, kafka_errors.KafkaError):
        # only aiokafka's own: an OSError or a timeout raised next to a Kafka client
        # start (S3's, say) is not Kafka's to explain
        candidates.append(("", exc))
    mapped = [
        m
        for where, error in candidates
        for cause in _chain(error)
        if (m := _classify(cause, where, config))
    ]
    if not mapped:
        return None
    # the most specific: a refusal explains a bootstrap failure better than a timeout
    return min(mapped, key=lambda m: _RANK[type(m)])


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and its causes: aiokafka's "Connection ... closed" carries the TLS alert or
    the reset that closed it as `__cause__`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_RANK: dict[type[KafkaConnectError], int] = {
    KafkaAuthFailed: 0,
    KafkaTlsFailed: 1,
    KafkaProtocolMismatch: 2,
    KafkaRefused: 3,
    KafkaConnectError: 4,
}

#: OpenSSL reasons that mean "this listener does not speak TLS"
_NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
)
#: alerts a broker sends when it refuses the client's certificate (or its absence)
_CLIENT_CERT_REFUSED = (
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "HANDSHAKE_FAILURE",
)


def _classify(
    exc: BaseException, where: str, config: KafkaConfig | None
) -> KafkaConnectError | None:
    at = where or (config.bootstrap_servers if config is not None else "the bootstrap servers")
    protocol = config.security_protocol if config is not None else "LHV_SECURITY_PROTOCOL"
    if isinstance(exc, kafka_errors.SaslAuthenticationFailed):
        who = (
            f"user {config.sasl_plain_username!r} via {config.sasl_mechanism}"
            if config is not None and config.uses_sasl
            else "the SASL user"
        )
        return KafkaAuthFailed(
            f"authentication failed for {who} at {at} ({_broker_says(exc)}): check "
            "LHV_SASL_USERNAME, LHV_SASL_PASSWORD and LHV_SASL_MECHANISM"
        )
    if isinstance(exc, kafka_errors.IllegalSaslStateError):
        return KafkaProtocolMismatch(
            f"Kafka at {at} refused the SASL handshake: protocol mismatch? the listener "
            f"does not use SASL and LHV_SECURITY_PROTOCOL is {protocol}"
        )
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        mechanism = config.sasl_mechanism if config is not None else "the SASL mechanism"
        return KafkaAuthFailed(
            f"Kafka at {at} does not accept {mechanism} ({_broker_says(exc)}): check "
            "LHV_SASL_MECHANISM"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = (
            f"CA file {config.ssl_cafile}"
            if config is not None and config.ssl_cafile
            else ("the system's CA certificates (LHV_SSL_CAFILE unset)")
        )
        return KafkaTlsFailed(
            f"TLS verification of Kafka at {at} failed against {ca}: "
            f"{exc.verify_message or exc.reason}: check LHV_SSL_CAFILE"
        )
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if any(r in reason for r in _NOT_TLS):
            return KafkaProtocolMismatch(
                f"the listener at {at} does not speak TLS ({exc.reason}): protocol mismatch? "
                f"LHV_SECURITY_PROTOCOL is {protocol}"
            )
        if any(r in reason for r in _CLIENT_CERT_REFUSED):
            cert = config.ssl_certfile if config is not None else None
            return KafkaTlsFailed(
                f"Kafka at {at} refused the client certificate "
                f"{cert or '(none: LHV_SSL_CERTFILE unset)'} ({exc.reason}): check "
                "LHV_SSL_CERTFILE and LHV_SSL_KEYFILE"
            )
        return KafkaTlsFailed(f"TLS handshake with Kafka at {at} failed ({exc.reason or exc})")
    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH)
    ):
        return KafkaConnectError(
            f"nothing listening at {at} (connection refused): is the stack env sourced? "
            "check LHV_BOOTSTRAP_SERVERS"
        )
    if isinstance(exc, socket.gaierror):
        return KafkaConnectError(
            f"cannot resolve the bootstrap address {at} ({exc.strerror}): check "
            "LHV_BOOTSTRAP_SERVERS"
        )
    if isinstance(exc, ConnectionResetError | BrokenPipeError | asyncio.IncompleteReadError) or (
        isinstance(exc, kafka_errors.KafkaConnectionError) and "closed" in str(exc)
    ):
        return KafkaProtocolMismatch(
            f"Kafka at {at} closed the connection during the handshake: protocol mismatch? "
            f"LHV_SECURITY_PROTOCOL is {protocol}; check it against the listener"
        )
    if isinstance(
        exc, TimeoutError | kafka_errors.KafkaTimeoutError | kafka_errors.RequestTimedOutError
    ):
        return KafkaConnectError(
            f"no answer from Kafka at {at} in time: check LHV_BOOTSTRAP_SERVERS (a TLS "
            f"listener spoken to without TLS also stays silent; LHV_SECURITY_PROTOCOL is "
            f"{protocol})"
        )
    if isinstance(exc, kafka_errors.KafkaConnectionError):
        return KafkaConnectError(
            f"cannot connect to Kafka at {at} ({exc}): is the stack env sourced? check "
            "LHV_BOOTSTRAP_SERVERS"
        )
    return None


def _broker_says(exc: BaseException) -> str:
    text = str(exc).strip()
    if text.startswith("[Error ") and ": " in text:  # aiokafka's "[Error 58] Name: message"
        text = text.split(": ", 1)[1]
    return f"broker says: {text}" if text else type(exc).__name__
