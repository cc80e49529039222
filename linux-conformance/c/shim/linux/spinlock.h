/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* tdmem linux-conformance shim header: stands in for the kernel header of this name with the
 * few declarations the compiled files use, written for user space. */
#pragma once
/* One lock word per lock; the harness runs the kernel code on one thread at a time (it holds a
 * Rust mutex around every call), so the lock only has to record that it is held. */
#define DEFINE_SPINLOCK(x) spinlock_t x = { 0 }
#define spin_lock_irqsave(l, f) do { (f) = 0; tdmem_lock(&(l)->unused); } while (0)
#define spin_unlock_irqrestore(l, f) do { (void)(f); tdmem_unlock(&(l)->unused); } while (0)
#define spin_lock(l) tdmem_lock(&(l)->unused)
#define spin_unlock(l) tdmem_unlock(&(l)->unused)
void tdmem_lock(int *word);
void tdmem_unlock(int *word);
#define touch_softlockup_watchdog() do { } while (0)
