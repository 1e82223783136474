"""Containers: OCI spec building, lifecycle and status."""
