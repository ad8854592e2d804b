"""vscsi: a userspace virtual SCSI target over LIO/TCMU that emulates array volumes."""

__version__ = "0.1.0"
