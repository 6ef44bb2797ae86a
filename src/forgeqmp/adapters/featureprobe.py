"""The feature probe: the three QMP queries whose replies :mod:`forgeqmp.core.features` reads."""

from __future__ import annotations

from forgeqmp.adapters.qmp import QMPConnection
from forgeqmp.core.features import Features, features_from_introspection

__all__ = ["probe"]


async def probe(conn: QMPConnection) -> Features:
    """Ask QEMU what it supports (three QMP queries, a few ms)."""
    version = await conn.execute("query-version")
    schema = await conn.execute("query-qmp-schema")
    capabilities = await conn.execute("query-migrate-capabilities")
    return features_from_introspection(version, schema, capabilities)
