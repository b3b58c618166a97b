"""The coordinator: registry of nodes and services, cluster status."""
