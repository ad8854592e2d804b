"""Host-side tools: talk to vscsi LUNs through the kernel like any initiator, not the daemon."""
