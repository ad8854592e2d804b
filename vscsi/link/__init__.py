"""The link between two arrays: frames (`frames`), key material (`keys`, `tls`), sessions
(`session`) and their errors (`errors`), the remote `Replica` and `Peer` (`replica`, `peer`) and
the namespace its sockets live in (`netns`). This package imports nothing itself: the config
loader uses `netns` and the pair layer `errors` without the sessions, which only a daemon with
`[[remote]]` peers imports (TLS and cryptography are a large share of a start)."""
