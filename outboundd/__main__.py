"""``python -m outboundd`` runs the relay, like the ``outboundd`` command."""

import sys

from outboundd.daemon import main

sys.exit(main())
