"""Alias of `memlong.deploy.stack` (moved there: assembling the services is deployment, above them).
Kept while work in flight still imports this name; the rename step deletes it."""

import sys

from memlong.deploy import stack

sys.modules[__name__] = stack
