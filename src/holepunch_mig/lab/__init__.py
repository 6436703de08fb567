"""Firewall and NAT topologies in network namespaces, the traversal matrix, the doctor."""
