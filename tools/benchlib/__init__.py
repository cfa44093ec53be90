"""Helpers for ``tools/bench``: process-tree accounting, traffic, relays, reports.

Kept as a package beside the script (not inside ``outboundd``) because the
benchmark drives three different relays and must not depend on the code it
measures.
"""
