"""The per-container shim program: stdlib-only, holds stdio, writes logs."""
