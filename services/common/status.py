"""Alias of `memlong.rpc.status` (moved there: the public client needs it and the core never imports a
service). Kept while work in flight still imports this name; the rename step deletes it."""

import sys

from memlong.rpc import status

sys.modules[__name__] = status
