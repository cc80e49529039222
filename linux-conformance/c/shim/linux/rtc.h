/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/* tdmem linux-conformance shim header: stands in for the kernel header of this name with the
 * few declarations the compiled files use, written for user space. */
#pragma once
