"""Local pairs (ShadowImage-style): state machine, durable records, VPD page 0xC0, engine.

The daemon builds one `manager.PairManager` over its volumes and stacks `manager.volume(name)`
under each LUN, with `vendor_pages=manager.vendor_pages(name)`. This package imports nothing
itself, so that host-side tools reading page 0xC0 start without the engine.
"""
