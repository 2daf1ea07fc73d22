"""``python -m swiftk.hosts``: a plugin host (see ``swiftk.hosts.host``). Plugins that import
``swiftk.hosts.host`` then see the very module that serves them."""

import sys

from swiftk.hosts.host import main

sys.exit(main())
