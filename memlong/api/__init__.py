"""Code generated from proto/ (the gRPC contracts, packages memlong.<service>.v1); regenerate with
`python -m memlong.protogen`."""
