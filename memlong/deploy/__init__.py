"""Deployment: the three services assembled and run (the embedded default `memlong up`, the Ray Serve
application). Sits on top: it imports the services; neither the core nor a service imports it."""
