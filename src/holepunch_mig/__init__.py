"""holepunch_mig: migration data through a TCP link punched between firewalled hosts.

Public API (see docs/api.md): :func:`connect` (trio), :func:`connect_blocking` (threads),
:func:`connect_asyncio` (asyncio), the control-channel adapters, the report and the errors.
"""

from __future__ import annotations

from holepunch_mig.errors import (
    ChannelClosed,
    ControlTimeout,
    HandoffRefused,
    HandshakeError,
    HolepunchError,
    NoDirectPath,
    PeerAbort,
    ProtocolError,
    RecordError,
    ResumeFailed,
    TransferError,
    TruncatedStream,
    TunnelRefused,
)
from holepunch_mig.migration.api import (
    BlockingMigrationProxy,
    MigrationError,
    MigrationProgress,
    MigrationProxy,
    MigrationReport,
    StreamReport,
    migration_destination,
    migration_destination_blocking,
    migration_source,
    migration_source_blocking,
)
from holepunch_mig.net.control import (
    ControlChannel,
    StreamChannel,
    open_process_channel,
    open_tcp_channel,
    stdio_channel,
)
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.report import Interruption, PairReport, Report
from holepunch_mig.session.api import (
    BlockingLink,
    abort,
    connect,
    connect_asyncio,
    connect_blocking,
)
from holepunch_mig.session.link import Link, TransferResult
from holepunch_mig.session.options import ConnectOptions
from holepunch_mig.testing import memory_channel_pair

__version__ = "0.1.0"

__all__ = [
    "BlockingLink",
    "BlockingMigrationProxy",
    "ChannelClosed",
    "ConnectOptions",
    "ControlChannel",
    "ControlTimeout",
    "HandoffRefused",
    "HandshakeError",
    "HolepunchError",
    "Interruption",
    "Link",
    "MigrationError",
    "MigrationProgress",
    "MigrationProxy",
    "MigrationReport",
    "NoDirectPath",
    "PairReport",
    "PeerAbort",
    "ProtocolError",
    "PunchTiming",
    "RecordError",
    "Report",
    "ResumeFailed",
    "StreamChannel",
    "StreamReport",
    "TransferError",
    "TransferResult",
    "TruncatedStream",
    "TunnelRefused",
    "abort",
    "connect",
    "connect_asyncio",
    "connect_blocking",
    "memory_channel_pair",
    "migration_destination",
    "migration_destination_blocking",
    "migration_source",
    "migration_source_blocking",
    "open_process_channel",
    "open_tcp_channel",
    "stdio_channel",
]
