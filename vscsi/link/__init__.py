"""The link between two arrays: frames (`frames`), key material (`keys`, `tls`), sessions
(`session`), the remote `Replica` (`replica`) and the namespace its sockets live in (`netns`).
This package imports nothing itself: the config loader uses `netns` without the sessions."""
