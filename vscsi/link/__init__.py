"""The link between two arrays: frames, key material, sessions and the remote `Replica`."""
