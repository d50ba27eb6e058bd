"""Alias of `memlong.rpc.channel` (moved there: the public client needs it and the core never imports a
service). Kept while work in flight still imports this name; the rename step deletes it."""

import sys

from memlong.rpc import channel

sys.modules[__name__] = channel
