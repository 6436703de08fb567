"""holepunch_mig: migration data through a TCP link punched between firewalled hosts.

Public API (see docs/api.md): :func:`connect` (trio), :func:`connect_blocking` (threads),
:func:`connect_asyncio` (asyncio), the control-channel adapters, the report and the errors.
"""

from __future__ import annotations

from holepunch_mig.errors import (
    ChannelClosed,
    CommitFailed,
    ControlAuthError,
    ControlRejected,
    ControlTimeout,
    CredentialError,
    HandoffRefused,
    HandshakeError,
    HolepunchError,
    NoDirectPath,
    PairingFailed,
    PeerAbort,
    ProtocolError,
    RecordError,
    ResumeFailed,
    TransferError,
    TruncatedStream,
    TunnelRefused,
    UnknownPeer,
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
from holepunch_mig.migration.libvirt import (
    LibvirtProgress,
    LibvirtProxy,
    LibvirtReport,
    libvirt_destination,
    libvirt_destination_blocking,
    libvirt_source,
    migrate_domain,
    migrate_domain_blocking,
)
from holepunch_mig.net.control import (
    ControlChannel,
    StreamChannel,
    open_process_channel,
    open_tcp_channel,
    stdio_channel,
)
from holepunch_mig.net.keyfiles import (
    load_auth,
    read_identity,
    read_peers,
    read_secret,
    write_private_key,
)
from holepunch_mig.net.punch import PunchTiming
from holepunch_mig.net.secure_control import (
    SecureChannel,
    accept_authenticated,
    connect_authenticated,
    secure,
)
from holepunch_mig.report import HardNatReport, Interruption, PairReport, Report
from holepunch_mig.session.api import (
    BlockingLink,
    abort,
    connect,
    connect_asyncio,
    connect_blocking,
)
from holepunch_mig.session.link import Link, TransferResult
from holepunch_mig.session.options import BirthdayBudget, ConnectOptions
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire.control_auth import ControlAuth, PairingCode
from holepunch_mig.wire.identity import Identity, PeerKey, PeerSet, parse_peer_line

__version__ = "0.1.0"

__all__ = [
    "BirthdayBudget",
    "BlockingLink",
    "BlockingMigrationProxy",
    "ChannelClosed",
    "CommitFailed",
    "ConnectOptions",
    "ControlAuth",
    "ControlAuthError",
    "ControlChannel",
    "ControlRejected",
    "ControlTimeout",
    "CredentialError",
    "HandoffRefused",
    "HandshakeError",
    "HardNatReport",
    "HolepunchError",
    "Identity",
    "Interruption",
    "LibvirtProgress",
    "LibvirtProxy",
    "LibvirtReport",
    "Link",
    "MigrationError",
    "MigrationProgress",
    "MigrationProxy",
    "MigrationReport",
    "NoDirectPath",
    "PairReport",
    "PairingCode",
    "PairingFailed",
    "PeerAbort",
    "PeerKey",
    "PeerSet",
    "ProtocolError",
    "PunchTiming",
    "RecordError",
    "Report",
    "ResumeFailed",
    "SecureChannel",
    "StreamChannel",
    "StreamReport",
    "TransferError",
    "TransferResult",
    "TruncatedStream",
    "TunnelRefused",
    "UnknownPeer",
    "abort",
    "accept_authenticated",
    "connect",
    "connect_asyncio",
    "connect_authenticated",
    "connect_blocking",
    "libvirt_destination",
    "libvirt_destination_blocking",
    "libvirt_source",
    "load_auth",
    "memory_channel_pair",
    "migrate_domain",
    "migrate_domain_blocking",
    "migration_destination",
    "migration_destination_blocking",
    "migration_source",
    "migration_source_blocking",
    "open_process_channel",
    "open_tcp_channel",
    "parse_peer_line",
    "read_identity",
    "read_peers",
    "read_secret",
    "secure",
    "stdio_channel",
    "write_private_key",
]
