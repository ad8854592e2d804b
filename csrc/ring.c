/* Acquire loads and release stores on the TCMU mailbox: see ring.h for why. */
#include "ring.h"

uint32_t ring_load_acquire_u32(const char *base, size_t off)
{
    return __atomic_load_n((const uint32_t *)(base + off), __ATOMIC_ACQUIRE);
}

void ring_store_release_u32(char *base, size_t off, uint32_t value)
{
    __atomic_store_n((uint32_t *)(base + off), value, __ATOMIC_RELEASE);
}

void ring_store_u64(char *base, size_t off, uint64_t value)
{
    __atomic_store_n((uint64_t *)(base + off), value, __ATOMIC_RELAXED);
}
