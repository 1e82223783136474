"""Private task layer: task manager, runc wrapper, shims, exit events."""
