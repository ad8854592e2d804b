"""Host groups: volumes exported over LIO's iSCSI fabric to the initiators of a host group, on
array-style ports (docs/host-groups.md)."""
