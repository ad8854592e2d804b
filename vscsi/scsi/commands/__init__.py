"""Command handlers, one module per command set: `primary` (SPC-4) and `block` (SBC-3).

A handler takes the LUN, the CDB and the data buffer, returns the number of data-in bytes it
produced, and raises `SenseError` (or a volume error) to end in CHECK CONDITION. Which
handler serves which opcode is the `HANDLERS` table in `vscsi/scsi/lun.py`.
"""
