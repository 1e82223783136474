"""CNI: network config discovery, plugin exec and result cache."""
