"""The gRPC plumbing the public client and the services share: the channel factory and deadlines
(`channel`), the status table (`status`), TLS policies (`tls`), the installation secret (`internal`),
spans and metrics (`tracing`, `metrics`). It imports the core, never a service."""
