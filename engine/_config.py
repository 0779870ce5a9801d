"""``EngineConfig``: the engine's timeouts and budgets, validated where the config is made."""

from __future__ import annotations

import math
from typing import Any

import attrs
from kvhandoff.engine.errors import EngineConfigError
from kvhandoff.sessions import HealthPolicy

__all__ = ["EngineConfig"]


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise EngineConfigError(attribute.name, value, "a positive finite number")


def _optional_positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive(instance, attribute, value)


def _non_negative_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EngineConfigError(attribute.name, value, "a non-negative int")


def _positive_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EngineConfigError(attribute.name, value, "a positive int")


def _optional_non_negative_int(instance: Any, attribute: attrs.Attribute[Any],
                               value: Any) -> None:
    if value is not None:
        _non_negative_int(instance, attribute, value)


@attrs.frozen
class EngineConfig:
    """Timeouts and budgets of a ``TransferEngine``; validated where it is made.

    ``queue_timeout_s`` bounds the wait from ``send``/``receive`` to the handshake,
    ``transfer_timeout_s`` the transfer from the handshake (a long queue is not a wedged
    transport). ``lease_s``: a peer with open transfers that sends nothing (heartbeats are
    sent every ``heartbeat_interval_s``, default a quarter lease) for that long is declared
    lost. ``quarantine_budget``, ``progress_deadline_s`` and ``restart_grace_s`` are the
    health policy. ``drain_timeout_s`` bounds the drain when the engine's context exits.
    ``idle_sleep_s`` is the pause of a tick that found nothing to do.
    ``region_min_bytes``: a transport that moves regions natively (``moves_regions``) moves
    a transfer's blocks where they are when its regions (one per run of consecutive block
    ids per layer tensor) average at least this many bytes, and through the pipelined
    staging buffer otherwise. ``None`` (default): the transport's own measured hint
    (``Transport.region_min_bytes``; MPITransport's keeps the staged path, see
    docs/benchmarks.md); 0: always the region path where the transport offers it. Each side
    chooses alone; both carry the same bytes. ``staging_window``: the staged path holds at
    most this many pieces (``PIECE_BYTES`` each) of a transfer in staging memory at once;
    each side chooses alone.

    ``max_early_advertises`` bounds, *per peer*, the advertises kept for a ``send()`` that
    has not come yet (one peer's junk never crowds out another's). ``confirm_grace_s``
    (default: one lease) is how long a sender that posted waits past its transfer deadline
    for the receiver's word (DONE or FAIL) before it gives up with an unknown outcome.
    ``checksum``: the receiver asks the sender for a CRC-32 of the bytes sent and compares
    it with what landed before it confirms; a mismatch fails both sides with
    ``checksum_mismatch``. Off by default (it reads every byte once more on each side).
    """

    queue_timeout_s: float | None = attrs.field(default=30.0, validator=_optional_positive)
    transfer_timeout_s: float | None = attrs.field(default=30.0, validator=_optional_positive)
    lease_s: float = attrs.field(default=10.0, validator=_positive)
    heartbeat_interval_s: float | None = attrs.field(default=None,
                                                     validator=_optional_positive)
    quarantine_budget: int = attrs.field(default=16, validator=_non_negative_int)
    progress_deadline_s: float = attrs.field(default=60.0, validator=_positive)
    restart_grace_s: float = attrs.field(default=120.0, validator=_positive)
    drain_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    idle_sleep_s: float = attrs.field(default=0.0005, validator=_positive)
    max_early_advertises: int = attrs.field(default=65536, validator=_non_negative_int)
    agreement_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    recent_sessions: int = attrs.field(default=4096, validator=_non_negative_int)
    region_min_bytes: int | None = attrs.field(default=None,
                                               validator=_optional_non_negative_int)
    staging_window: int = attrs.field(default=4, validator=_positive_int)
    confirm_grace_s: float | None = attrs.field(default=None, validator=_optional_positive)
    checksum: bool = attrs.field(default=False)

    @checksum.validator
    def _check_checksum(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if type(value) is not bool:
            raise EngineConfigError(attribute.name, value, "True or False")

    @property
    def sender_confirm_grace_s(self) -> float:
        """``confirm_grace_s``, or one lease when unset."""
        return self.lease_s if self.confirm_grace_s is None else self.confirm_grace_s

    @property
    def heartbeat_every_s(self) -> float:
        if self.heartbeat_interval_s is not None:
            return self.heartbeat_interval_s
        return self.lease_s / 4

    @property
    def unsettled_grace_s(self) -> float:
        """How long a TP group may leave a request unsettled before each rank releases it on
        its own quiescence: both timeouts, and at least one agreement timeout."""
        waits = (self.queue_timeout_s or 0.0) + (self.transfer_timeout_s or 0.0)
        return max(waits, self.agreement_timeout_s)

    def health_policy(self) -> HealthPolicy:
        return HealthPolicy(
            quarantine_budget=self.quarantine_budget,
            progress_deadline_s=self.progress_deadline_s,
            restart_grace_s=self.restart_grace_s,
        )
