/*
 * Ordered access to the TCMU mailbox, which the kernel and the daemon share through the uio map.
 *
 * The kernel publishes a command entry with smp_store_release on cmd_head (UPDATE_HEAD in
 * target_core_user.c) and reads cmd_tail with READ_ONCE before it reads the completed entries.
 * On a weakly ordered CPU (arm64, POWER) plain loads and stores on our side may be reordered
 * around those, so we read cmd_head with acquire and store cmd_tail with release, as libtcmu
 * does for cmd_head (tcmu-runner issue 688, an aarch64 crash). On x86 both compile to a plain
 * mov: the cost is the call.
 *
 * `base` is the start of the map, `off` a 4-aligned byte offset in it.
 * These declarations are also parsed by cffi (vscsi/_build.py): keep them plain.
 */
#ifndef VSCSI_RING_H
#define VSCSI_RING_H

#include <stddef.h>
#include <stdint.h>

uint32_t ring_load_acquire_u32(const char *base, size_t off);
void ring_store_release_u32(char *base, size_t off, uint32_t value);

#endif
