"""``python -m outboundd`` runs the relay, like the ``outboundd`` command."""

import sys

from outboundd import early_stop

# Before the imports below, which take most of a child's start-up time.
early_stop.catch()

from outboundd.daemon import main  # noqa: E402

sys.exit(main())
