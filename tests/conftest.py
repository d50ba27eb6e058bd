"""Process-wide test settings, applied before any test module imports a library."""

import os

# Every server a test starts talks over loopback only, Ray's included: Ray otherwise resolves
# 127.0.0.1 to the machine's interface address (see memlong/deploy/ray_app/cli.py, SINGLE_NODE_ENV).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
