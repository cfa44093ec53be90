"""The PostgreSQL spool backend (``outbound.ini queue_url = postgresql://...``)."""

from outboundd.spool.postgres.core import PostgresSpool

__all__ = ["PostgresSpool"]
