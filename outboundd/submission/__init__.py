"""Submission: the SMTP listeners, relay policy, message preparation and ``send_email``.

Modules: :mod:`.server` (listeners), :mod:`.handler` (the SMTP session),
:mod:`.policy` (pure decisions), :mod:`.prepare` (pure header work),
:mod:`.queueing` (hooks + spool write), :mod:`.transaction` (the hook
``txn``), :mod:`.replies` (reply values), :mod:`.api` (``send_email``).
"""
