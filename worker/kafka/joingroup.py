"""One JoinGroup per join when a consumer lists several assignors (aiokafka 0.14.0).

aiokafka 0.14.0's `CoordinatorGroupRebalance.perform_group_join` sends its JoinGroup
request inside the loop over the consumer's assignors: a member listing LHV's assignor and
then the range assignor sends one JoinGroup listing `[lhv-standby]`, waits for it to
complete, and sends another listing `[lhv-standby, range]`. Each changes the member's
protocols as the coordinator last saw them, so each starts a new rebalance of the whole
group, and two such members can keep rebalancing each other for minutes (heartbeats answer
"the group is rebalancing" while no generation settles). Upstream:
https://github.com/aio-libs/aiokafka/pull/1168 (open when this was written).

`install()` replaces that method with the same code, the request sent once after the loop,
when the installed aiokafka is the version known to need it; any other version is left as
it is. The worker calls it before it starts a consumer with more than one assignor.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiokafka
import aiokafka.errors as Errors
from aiokafka.consumer import group_coordinator
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.protocol.group import JoinGroupRequest

__all__ = ["install"]

log = logging.getLogger(__name__)
#: the copied method logs as aiokafka's own did (kept at WARNING by the worker's logging)
_aiokafka_log = group_coordinator.log

#: the aiokafka versions whose `perform_group_join` sends a JoinGroup per assignor
AFFECTED = frozenset({"0.14.0"})


def install() -> bool:
    """Patch `CoordinatorGroupRebalance.perform_group_join` on an affected aiokafka
    (idempotent); returns whether the fixed method is in place."""
    rebalance = group_coordinator.CoordinatorGroupRebalance
    if rebalance.perform_group_join is _perform_group_join:
        return True
    if aiokafka.__version__ not in AFFECTED:
        return False
    rebalance.perform_group_join = _perform_group_join
    log.debug("aiokafka %s: one JoinGroup per join (aio-libs/aiokafka#1168)", aiokafka.__version__)
    return True


async def _perform_group_join(self: Any) -> tuple[str, bytes] | None:
    """aiokafka 0.14.0's `perform_group_join`, with the JoinGroup request (and its
    KIP-394 retry with the member id the coordinator assigns) sent once, listing every
    assignor, after the loop that collects their metadata."""
    _aiokafka_log.info("(Re-)joining group %s", self.group_id)

    topics = self._subscription.topics
    metadata_list = []
    for assignor in self._assignors:
        metadata = assignor.metadata(topics)
        if not isinstance(metadata, bytes):
            metadata = metadata.encode()
        metadata_list.append((assignor.name, metadata))

    try_join = True
    while try_join:
        try_join = False
        request = JoinGroupRequest(
            self.group_id,
            self._session_timeout_ms,
            self._rebalance_timeout_ms,
            self._coordinator.member_id,
            self._coordinator._group_instance_id,
            ConsumerProtocol.PROTOCOL_TYPE,
            metadata_list,
        )
        _aiokafka_log.debug(
            "Sending JoinGroup (%s) to coordinator %s", request, self.coordinator_id
        )
        try:
            response = await self._coordinator._send_req(request)
        except Errors.KafkaError:
            # a connection error: the coordinator lookup backs off
            return None
        if not self._subscription.active:
            # the subscription changed: ignore the response and join again
            return None
        error_type = Errors.for_code(response.error_code)
        if error_type is Errors.MemberIdRequired:
            self._coordinator.member_id = response.member_id
            try_join = True

    if error_type is Errors.NoError:
        _aiokafka_log.debug("Join group response %s", response)
        self._coordinator.member_id = response.member_id
        self._coordinator.generation = response.generation_id
        protocol = response.group_protocol
        _aiokafka_log.info(
            "Joined group '%s' (generation %s) with member_id %s",
            self.group_id,
            response.generation_id,
            response.member_id,
        )
        if response.leader_id == response.member_id:
            _aiokafka_log.info(
                "Elected group leader -- performing partition assignments using %s", protocol
            )
            assignment_bytes = await self._on_join_leader(response)
        else:
            assignment_bytes = await self._on_join_follower()
        if assignment_bytes is None:
            return None
        return (protocol, assignment_bytes)
    if error_type is Errors.GroupLoadInProgressError:
        _aiokafka_log.debug(
            "Attempt to join group %s rejected since coordinator %s is loading the group.",
            self.group_id,
            self.coordinator_id,
        )
        await asyncio.sleep(self._retry_backoff_ms / 1000)
    elif error_type is Errors.UnknownMemberIdError:
        self._coordinator.reset_generation()
        _aiokafka_log.debug(
            "Attempt to join group %s failed due to unknown member id", self.group_id
        )
    elif error_type in (
        Errors.GroupCoordinatorNotAvailableError,
        Errors.NotCoordinatorForGroupError,
    ):
        err = error_type()
        self._coordinator.coordinator_dead()
        _aiokafka_log.debug(
            "Attempt to join group %s failed due to obsolete coordinator information: %s",
            self.group_id,
            err,
        )
    elif error_type in (
        Errors.InconsistentGroupProtocolError,
        Errors.InvalidSessionTimeoutError,
        Errors.InvalidGroupIdError,
    ):
        err = error_type()
        _aiokafka_log.error("Attempt to join group failed due to fatal error: %s", err)
        raise err
    elif error_type is Errors.GroupAuthorizationFailedError:
        raise error_type(self.group_id)
    else:
        err = error_type()
        _aiokafka_log.error("Unexpected error in join group '%s' response: %s", self.group_id, err)
        raise Errors.KafkaError(repr(err))
    return None
