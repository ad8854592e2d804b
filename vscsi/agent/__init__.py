"""The external failover agent (`vscsi agent`): it watches both arrays of a remote pair and,
when the P-VOL's site is down and only then, runs the takeover at the S site and has the
storage server remount. Neither array fails over by itself (TrueCopy's rule): this is the
"external utility that checks the health of the system and makes appropriate decisions".

`config.py` reads agent.toml, `health.py` makes the checks, `policy.py` is the decision (pure),
`run.py` the loop that acts on it, `command.py` the command line.
"""
